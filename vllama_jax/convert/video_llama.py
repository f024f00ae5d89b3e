"""Video-LLaMA key mapping: the original model's full state dict (every top-level prefix) <-> our params.

`load_state_dict` / `export_state_dict` are the two entry points the tests and `vllama-convert` use; they
work for any component on its own too (pass that component's rules and scanned subtrees).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from vllama_jax.convert import eva_vit, imagebind, llama, qformer
from vllama_jax.convert.mapping import (
    ConversionError,
    Rule,
    flat_params_to_torch,
    flatten,
    prefixed,
    stack_numbered,
    torch_to_flat_params,
    unflatten,
    unstack_numbered,
)
from vllama_jax.models.video_llama import VideoLlamaConfig

# Keys a full Video-LLaMA / BLIP-2 state dict carries that the model does not use, on purpose.
UNUSED_KEYS = (
    *(f"Qformer\\.{k}" for k in qformer.UNUSED_KEYS),
    *(f"video_Qformer\\.{k}" for k in qformer.UNUSED_KEYS),
    *(f"audio_Qformer\\.{k}" for k in qformer.UNUSED_KEYS),
    *(f"audio_encoder\\.{k}" for k in imagebind.UNUSED_KEYS),
    *(f"llama_model\\.{k}" for k in llama.UNUSED_KEYS),
)


def video_llama_rules(config: VideoLlamaConfig) -> list[Rule]:
    """Every parameter of the model (the audio branch too when the config equips it), by its original key."""
    rules = [
        *prefixed(eva_vit.vit_rules(config.vision), "visual_encoder.", "visual_encoder"),
        *eva_vit.ln_vision_rules(),
        *prefixed(qformer.qformer_rules(config.qformer), "Qformer.", "Qformer"),
        Rule("query_tokens", "query_tokens"),
        Rule("video_frame_position_embedding.weight", "video_frame_position_embedding/embedding"),
        *prefixed(qformer.qformer_rules(config.video_qformer), "video_Qformer.", "video_Qformer"),
        Rule("video_query_tokens", "video_query_tokens"),
        Rule("llama_proj.weight", "llama_proj/kernel", "linear"),
        Rule("llama_proj.bias", "llama_proj/bias"),
        *prefixed(llama.llama_rules(config.llm), "llama_model.", "llama_model"),
    ]
    if config.equip_audio_branch:
        rules += [
            *prefixed(
                imagebind.imagebind_rules(config.imagebind_audio, config.imagebind_vision),
                "audio_encoder.",
                "audio_encoder",
            ),
            Rule("audio_position_embedding.weight", "audio_position_embedding/embedding"),
            *prefixed(qformer.qformer_rules(config.audio_qformer), "audio_Qformer.", "audio_Qformer"),
            Rule("audio_query_tokens", "audio_query_tokens"),
            Rule("audio_llama_proj.weight", "audio_llama_proj/kernel", "linear"),
            Rule("audio_llama_proj.bias", "audio_llama_proj/bias"),
        ]
    return rules


def scanned_subtrees(config: VideoLlamaConfig) -> list[tuple[str, int]]:
    """(path, layer count) of each stacked layer subtree under the config's scan settings."""
    out = []
    if config.vision.scan_layers:
        out.append((f"visual_encoder/{eva_vit.SCANNED}", config.vision.num_layers))
    if config.qformer.scan_layers:
        out.append((f"Qformer/{qformer.SCANNED}", config.qformer.num_groups))
    if config.video_qformer.scan_layers:
        out.append((f"video_Qformer/{qformer.SCANNED}", config.video_qformer.num_groups))
    if config.llm.scan_layers:
        out.append((f"llama_model/{llama.SCANNED}", config.llm.num_layers))
    if config.equip_audio_branch:
        for tower in (config.imagebind_audio, config.imagebind_vision):
            if tower.scan_layers:
                out.append((f"audio_encoder/{tower.modality}/{imagebind.SCANNED}", tower.num_layers))
        if config.audio_qformer.scan_layers:
            out.append((f"audio_Qformer/{qformer.SCANNED}", config.audio_qformer.num_groups))
    return out


def load_state_dict(
    state_dict: Mapping[str, Any],
    rules: list[Rule],
    abstract_params: Any,
    scanned: Iterable[tuple[str, int]] = (),
    *,
    ignore: Iterable[str] = (),
    source_name: str = "state dict",
) -> dict:
    """Original-layout state dict -> nested params (numpy) shaped like `abstract_params` (which may be boxed).

    Raises ConversionError naming every missing, unexpected or mis-shaped key before returning anything.
    """
    scanned = list(scanned)
    flat_shapes = unscanned_shapes(abstract_params, scanned)
    flat = torch_to_flat_params(state_dict, rules, flat_shapes, source_name=source_name, ignore=ignore)
    for path, count in scanned:
        flat = stack_numbered(flat, path, count)
    return unflatten(flat)


def export_state_dict(params: Any, rules: list[Rule], scanned: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Nested params -> {original key: numpy array in PyTorch layout}; `scanned` lists stacked subtree paths."""
    flat = {k: np.asarray(v) for k, v in flatten(nn.unbox(params)).items()}
    for path in scanned:
        flat = unstack_numbered(flat, path)
    return flat_params_to_torch(flat, rules)


def unscanned_shapes(abstract_params: Any, scanned: Iterable[tuple[str, int]]) -> dict[str, tuple[int, ...]]:
    """Flat parameter shapes of a (possibly boxed) tree, every scanned stack split into its numbered layers."""
    return {k: v.shape for k, v in unscanned_abstract(abstract_params, scanned).items()}


def unscanned_abstract(abstract_params: Any, scanned: Iterable[tuple[str, int]]) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat parameter shapes and dtypes of a (possibly boxed) tree, every scanned stack split into its layers."""
    flat = {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for k, v in flatten(nn.unbox(abstract_params)).items()}
    for path, count in scanned:
        flat = _unstack_abstract(flat, path, count)
    return flat


def _unstack_abstract(flat: dict, path: str, count: int) -> dict:
    out = {k: v for k, v in flat.items() if not k.startswith(f"{path}/")}
    for key, leaf in flat.items():
        if key.startswith(f"{path}/"):
            if leaf.shape[0] != count:
                raise ConversionError(f"scanned subtree {path} has leading axis {leaf.shape[0]}, expected {count}")
            for i in range(count):
                out[f"{path}_{i}/{key[len(path) + 1 :]}"] = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return out
