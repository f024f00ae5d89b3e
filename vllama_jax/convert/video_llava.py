"""Video-LLaVA key mapping, as data: the original release layout and transformers' `-hf` layouts <-> our params.

Four layouts of one model (`LAYOUTS`), differing only in prefixes:
- "original" (`LanguageBind/Video-LLaVA-7B`): `model.image_tower.image_tower.*`, `model.video_tower.video_tower.*`
  (with the temporal layers), `model.mm_projector.{0,2}.*`, `model.layers.*`, `model.embed_tokens.*`,
  `model.norm.*`, `lm_head.*`;
- "hf" (what transformers 5 `save_pretrained` writes, and what export writes): `image_tower.*`, `video_tower.*`,
  `multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`, `language_model.lm_head.*`;
- "hf_hub" (`LanguageBind/Video-LLaVA-7B-hf` as published): as "hf" with `image_tower.vision_model.*` and
  `video_tower.vision_model.*`;
- "hf_state_dict" (a transformers 5 model's `state_dict()`): `model.image_tower.*`, `model.video_tower.*`,
  `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*`.

The transformers towers have no temporal layers: a config with `video_tower.temporal_attention=True` finds
their keys missing (refused), and `export_state_dict(..., layout="hf")` refuses such params unless told to
drop the temporal layers (`drop_temporal_attention=True`; `temporal_parameter_count` says how many go).
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from vllama_jax.convert import llama, sources
from vllama_jax.convert.mapping import ConversionError, Rule, expand_layers, flatten, prefixed, unflatten
from vllama_jax.convert.video_llama import export_state_dict, load_state_dict
from vllama_jax.models.clip_vit import ClipVitConfig
from vllama_jax.models.video_llava import VideoLlava, VideoLlavaConfig, init_params

# Per layer: key suffix, our path under `layers_{n}`, transform.
LAYER_TABLE = (
    *(
        row
        for proj in ("q_proj", "k_proj", "v_proj")
        for row in (
            (f"self_attn.{proj}.weight", f"self_attn/{proj}/kernel", "linear"),
            (f"self_attn.{proj}.bias", f"self_attn/{proj}/bias", "bias"),
        )
    ),
    ("self_attn.out_proj.weight", "self_attn/out_proj/kernel", "linear2"),
    ("self_attn.out_proj.bias", "self_attn/out_proj/bias", "same"),
    ("layer_norm1.weight", "layer_norm1/scale", "same"),
    ("layer_norm1.bias", "layer_norm1/bias", "same"),
    ("mlp.fc1.weight", "fc1/kernel", "linear"),
    ("mlp.fc1.bias", "fc1/bias", "same"),
    ("mlp.fc2.weight", "fc2/kernel", "linear"),
    ("mlp.fc2.bias", "fc2/bias", "same"),
    ("layer_norm2.weight", "layer_norm2/scale", "same"),
    ("layer_norm2.bias", "layer_norm2/bias", "same"),
)
# LanguageBind_Video_merge's temporal layers (`add_time_attn`), per layer.
TEMPORAL_TABLE = (
    ("temporal_embedding", "temporal_embedding", "same"),
    ("temporal_layer_norm1.weight", "temporal_layer_norm1/scale", "same"),
    ("temporal_layer_norm1.bias", "temporal_layer_norm1/bias", "same"),
    *((s.replace("self_attn", "temporal_attn"), t.replace("self_attn", "temporal_attn"), f)
      for s, t, f in LAYER_TABLE if s.startswith("self_attn")),
)
TOWER_TABLE = (
    ("embeddings.class_embedding", "class_embedding", "same"),
    ("embeddings.patch_embedding.weight", "patch_embedding/kernel", "conv"),
    ("embeddings.position_embedding.weight", "position_embedding", "same"),
    ("pre_layrnorm.weight", "pre_layrnorm/scale", "same"),
    ("pre_layrnorm.bias", "pre_layrnorm/bias", "same"),
    ("post_layernorm.weight", "post_layernorm/scale", "same"),
    ("post_layernorm.bias", "post_layernorm/bias", "same"),
)
# Buffers some checkpoints carry (CLIP's position ids before transformers 4.31, LLaMA's rotary frequencies).
UNUSED_KEYS = (r".*embeddings\.position_ids", r".*rotary_emb\.inv_freq")


@dataclasses.dataclass(frozen=True)
class Layout:
    image_tower: str  # key prefix of the image tower
    video_tower: str
    projector: tuple[str, str]  # key prefixes of the projector's two linear layers
    llm_model: str  # what replaces the LLaMA keys' `model.`
    llm_head: str  # what replaces `lm_head.`


# In the order `detect_layout` tries them: a prefix that begins another layout's comes after it.
LAYOUTS = {
    "original": Layout("model.image_tower.image_tower.", "model.video_tower.video_tower.",
                       ("model.mm_projector.0.", "model.mm_projector.2."), "model.", "lm_head."),
    "hf_state_dict": Layout("model.image_tower.", "model.video_tower.",
                            ("model.multi_modal_projector.linear_1.", "model.multi_modal_projector.linear_2."),
                            "model.language_model.", "lm_head."),
    "hf_hub": Layout("image_tower.vision_model.", "video_tower.vision_model.",
                     ("multi_modal_projector.linear_1.", "multi_modal_projector.linear_2."),
                     "language_model.model.", "language_model.lm_head."),
    "hf": Layout("image_tower.", "video_tower.", ("multi_modal_projector.linear_1.", "multi_modal_projector.linear_2."),
                 "language_model.model.", "language_model.lm_head."),
}


def tower_rules(config: ClipVitConfig) -> list[Rule]:
    """One tower's keys without prefix (`embeddings.…`, `encoder.layers.N.…`, …); layers past the one Video-LLaVA
    reads are `unused_layers_*` here (see models/clip_vit.py)."""
    rules = [Rule(s, t, f) for s, t, f in TOWER_TABLE]
    table = LAYER_TABLE + (TEMPORAL_TABLE if config.temporal_attention else ())
    for n in range(config.num_layers):
        ours = f"layers_{n}" if n < config.used_layers else f"unused_layers_{n - config.used_layers}"
        rules += expand_layers(table, f"encoder.layers.{n}", ours)
    return rules


def video_llava_rules(config: VideoLlavaConfig, layout: str = "original") -> list[Rule]:
    """Every parameter of the model by its key in `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown Video-LLaVA layout {layout!r}: expected one of {sorted(LAYOUTS)}")
    names = LAYOUTS[layout]
    rules = [
        *prefixed(tower_rules(config.image_tower), names.image_tower, "image_tower"),
        *prefixed(tower_rules(config.video_tower), names.video_tower, "video_tower"),
    ]
    for prefix, ours in zip(names.projector, ("linear_1", "linear_2")):
        rules += [Rule(f"{prefix}weight", f"mm_projector/{ours}/kernel", "linear"),
                  Rule(f"{prefix}bias", f"mm_projector/{ours}/bias")]
    for rule in prefixed(llama.llama_rules(config.llm), "", "language_model"):
        head, rest = rule.source.split(".", 1)
        prefix = names.llm_head if head == "lm_head" else names.llm_model
        rules.append(dataclasses.replace(rule, source=prefix + rest))
    return rules


def scanned_subtrees(config: VideoLlavaConfig) -> list[tuple[str, int]]:
    """(path, layer count) of each stacked layer subtree under the config's scan settings."""
    out = []
    for name, tower in (("image_tower", config.image_tower), ("video_tower", config.video_tower)):
        if tower.scan_layers:
            out.append((f"{name}/layers", tower.used_layers))
            if tower.num_layers > tower.used_layers:
                out.append((f"{name}/unused_layers", tower.num_layers - tower.used_layers))
    if config.llm.scan_layers:
        out.append((f"language_model/{llama.SCANNED}", config.llm.num_layers))
    return out


def detect_layout(keys) -> str:
    """The layout a set of keys is in, by its image tower's prefix."""
    for name, layout in LAYOUTS.items():
        if any(k.startswith(layout.image_tower) for k in keys):
            return name
    sample = ", ".join(sorted(keys)[:5])
    raise ConversionError(f"not a Video-LLaVA state dict (no image tower key of a known layout; first keys: {sample})")


# ---- files ----

def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint: one `.safetensors` / `.bin` / `.pth` file, or a folder holding one or
    sharded ones (with their index)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        return [path]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (path / f).exists()]
            if missing:
                raise FileNotFoundError(f"{index}: shard files missing: {', '.join(missing)}")
            return [path / f for f in files]
    found = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not found:
        raise FileNotFoundError(f"{path}: no .safetensors or .bin weight files")
    return found


class LazyStateDict(Mapping):
    """{key: array} over the tensors of checkpoint files, each read from its file when asked for (so an import
    holds the converted parameters, not a second copy of the source)."""

    def __init__(self, tensors: dict[str, sources.Tensor]):
        self.tensors = tensors

    def __getitem__(self, key: str) -> np.ndarray:
        return self.tensors[key].load()

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def read_state_dict(paths: str | Path | list) -> LazyStateDict:
    """Every tensor of the checkpoints at `paths` (later ones win key by key), lazily; each file's header is read
    here, so a damaged file is named before anything is loaded."""
    tensors: dict[str, sources.Tensor] = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for file in weight_files(path):
            read = sources._read_safetensors if file.suffix == ".safetensors" else sources._read_pth
            tensors.update(read(file))
    return LazyStateDict(tensors)


def import_params(state_dict: Mapping[str, Any], config: VideoLlavaConfig, abstract_params: Any, *,
                  source_name: str = "state dict") -> tuple[dict, str]:
    """(nested params shaped like `abstract_params`, the layout found). Every key must be mapped or in
    UNUSED_KEYS; every parameter filled at its exact shape. Raises ConversionError naming every problem."""
    layout = detect_layout(state_dict)
    params = load_state_dict(state_dict, video_llava_rules(config, layout), abstract_params,
                             scanned_subtrees(config), ignore=UNUSED_KEYS, source_name=f"{source_name} ({layout})")
    return params, layout


def temporal_parameter_count(params: Any) -> int:
    """Parameters of the video tower's temporal layers (what a transformers export drops)."""
    return sum(int(np.prod(np.shape(v))) for k, v in flatten(params).items() if _is_temporal(k))


def _is_temporal(path: str) -> bool:
    return path.startswith("video_tower/") and re.search(r"/temporal_(embedding|attn|layer_norm1)", path) is not None


def export_params(params: Any, config: VideoLlavaConfig, layout: str = "original", *,
                  drop_temporal_attention: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """({key: array in PyTorch layout}, parameters dropped). The transformers layouts hold no temporal layers:
    refused for a video tower that has them unless `drop_temporal_attention`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown Video-LLaVA layout {layout!r}: expected one of {sorted(LAYOUTS)}")
    dropped = 0
    if layout != "original" and config.video_tower.temporal_attention:
        dropped = temporal_parameter_count(params)
        if not drop_temporal_attention:
            raise ConversionError(
                f"the transformers layout has no temporal attention: exporting would drop the video tower's "
                f"{dropped:,} temporal parameters, and transformers would then compute different video features; "
                f"pass --drop_temporal_attention to export anyway, or export --format=video_llava"
            )
        flat = {k: v for k, v in flatten(params).items() if not _is_temporal(k)}
        params = unflatten(flat)
        config = dataclasses.replace(config, video_tower=dataclasses.replace(config.video_tower,
                                                                              temporal_attention=False))
    scanned = [path for path, _ in scanned_subtrees(config)]
    return export_state_dict(params, video_llava_rules(config, layout), scanned), dropped


def hf_config(config: VideoLlavaConfig) -> dict:
    """transformers' `VideoLlavaConfig` for the model (one vision config serves both towers there)."""
    towers = [dataclasses.replace(t, temporal_attention=False, dtype="float32", param_dtype="float32",
                                  scan_layers=False, remat_policy="none")
              for t in (config.image_tower, config.video_tower)]
    if towers[0] != dataclasses.replace(towers[1], num_frames=towers[0].num_frames):
        raise ConversionError("transformers' Video-LLaVA has one vision config for both towers; these differ: "
                              f"{config.image_tower} vs {config.video_tower}")
    tower, llm = config.image_tower, config.llm
    if max(config.image_token_id, config.video_token_id) >= llm.vocab_size:
        raise ConversionError(
            f"transformers looks up the <image> / <video> ids ({config.image_token_id}, {config.video_token_id}) "
            f"in the embedding table of {llm.vocab_size} rows: give the model a vocabulary that holds them "
            f"(Video-LLaVA-7B-hf: 32064 rows, ids 32000 / 32001)"
        )
    return {
        "architectures": ["VideoLlavaForConditionalGeneration"],
        "model_type": "video_llava",
        "image_token_index": config.image_token_id,
        "video_token_index": config.video_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": tower.select_layer,
        "image_seq_length": config.image_tokens,
        "video_seq_length": config.video_tokens,
        "tie_word_embeddings": False,
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": tower.width, "intermediate_size": tower.mlp_dim,
            "num_hidden_layers": tower.num_layers, "num_attention_heads": tower.num_heads,
            "image_size": tower.image_size, "patch_size": tower.patch_size, "hidden_act": tower.hidden_act,
            "layer_norm_eps": tower.layer_norm_eps, "projection_dim": 768,
        },
        "text_config": {
            "model_type": "llama", "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
            "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_layers,
            "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
            "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta, "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
        },
    }


def save_state_dict(state_dict: Mapping[str, np.ndarray], out: str | Path, *, config_json: dict | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """A folder of safetensors shards with their index (and `config.json` when given), written as
    `<out>.partial` and renamed at the end; refuses an existing `out`, leaves nothing behind on failure."""
    from safetensors.torch import save_file

    from vllama_jax.convert.torch_io import removed_on_error, torch_tensors

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; refusing to overwrite")
    partial = out.with_name(out.name + ".partial")
    with removed_on_error(partial):
        partial.mkdir(parents=True)
        shards, current, size = [], {}, 0
        for key in sorted(state_dict):
            if current and size + state_dict[key].nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[key] = state_dict[key]
            size += state_dict[key].nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(torch_tensors(shard), str(partial / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(int(a.nbytes) for a in state_dict.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        if config_json is not None:
            (partial / "config.json").write_text(json.dumps(config_json, indent=1))
        partial.rename(out)
    return out


# ---- `vllama-convert` for the video_llava family ----

def abstract_params(config: VideoLlavaConfig) -> dict:
    """The model's parameter shapes and dtypes, without allocating them."""
    return nn.unbox(jax.eval_shape(lambda: init_params(VideoLlava(config), jax.random.PRNGKey(0))))


def run_import(config: VideoLlavaConfig, *, source_paths, out: str, dry_run: bool = False, log=print) -> int:
    """Import Video-LLaVA checkpoints (original or transformers layout; later sources win key by key) into one
    orbax parameter checkpoint at `out`, every array in the model's parameter dtype."""
    from vllama_jax.checkpoints import save_params

    if Path(out).exists():
        raise FileExistsError(f"{out} already exists; refusing to overwrite")
    state = read_state_dict(list(source_paths))
    abstract = abstract_params(config)
    params, layout = import_params(state, config, abstract, source_name=", ".join(map(str, source_paths)))
    source_dtypes = {np.dtype(t.dtype).name for t in state.tensors.values()}
    params = jax.tree_util.tree_map(lambda x, a: np.asarray(x).astype(a.dtype, copy=False), params, abstract)
    bfloat16_params = any(np.dtype(a.dtype) == ml_dtypes.bfloat16 for a in jax.tree_util.tree_leaves(abstract))
    narrowed = bfloat16_params and source_dtypes - {"bfloat16"}
    count = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
    log(f"{layout} layout: {len(state)} tensors -> {count:,} parameters (source dtypes {sorted(source_dtypes)})")
    if narrowed:
        log(f"note: {sorted(source_dtypes - {'bfloat16'})} values rounded to the model's bfloat16 parameters")
    if dry_run:
        log("dry run: every key and shape checked; nothing written")
        return 0
    save_params(out, params)
    log(f"wrote {out}")
    return 0


def run_export(config: VideoLlavaConfig, params: dict, *, out: str, layout: str = "original",
               drop_temporal_attention: bool = False, log=print) -> int:
    """Write `params` as a folder of safetensors shards in `layout` ("original", or "hf" for transformers, with
    its config.json); nothing is written when refused."""
    if Path(out).exists():
        raise FileExistsError(f"{out} already exists; refusing to overwrite")
    config_json = hf_config(config) if layout != "original" else None
    state, dropped = export_params(params, config, layout, drop_temporal_attention=drop_temporal_attention)
    if dropped:
        log(f"dropped the video tower's temporal attention: {dropped:,} parameters (transformers has no place "
            f"for them; its video features will differ from the original's)")
    save_state_dict(state, out, config_json=config_json)
    log(f"wrote {out}: {len(state)} tensors in the {layout} layout")
    return 0
