"""The Video-LLaMA key mapping (`convert/video_llama.py`): the full state dict and the audio branch round-trip through
the original layout, strictly."""
import re

import jax
import numpy as np
import pytest

from vllama_jax.convert.mapping import ConversionError
from vllama_jax.convert.video_llama import (
    UNUSED_KEYS,
    export_state_dict,
    load_state_dict,
    scanned_subtrees,
    video_llama_rules,
)
from vllama_jax.testing import imagebind_reference as ib_ref


def test_full_state_dict_round_trip_and_strictness(tiny):
    cfg, params, *_ = tiny
    rules = video_llama_rules(cfg)
    state = export_state_dict(params, rules)
    assert {k.split(".")[0] for k in state} == {
        "visual_encoder", "ln_vision", "Qformer", "query_tokens", "video_frame_position_embedding",
        "video_Qformer", "video_query_tokens", "llama_proj", "llama_model",
    }
    assert state["llama_proj.weight"].shape == (64, 32)  # torch Linear layout (out, in)
    assert state["visual_encoder.blocks.0.attn.qkv.weight"].shape == (3 * 48, 48)
    back = load_state_dict(state, rules, params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # keys dropped on purpose pass only when listed; anything else is named in the error
    extra = dict(state, **{"Qformer.cls.predictions.bias": np.zeros(3)})
    with pytest.raises(ConversionError, match="Qformer.cls.predictions.bias"):
        load_state_dict(extra, rules, params)
    from vllama_jax.convert.video_llama import UNUSED_KEYS

    load_state_dict(extra, rules, params, ignore=UNUSED_KEYS)
    # a tensor with the right element count in the wrong layout is refused, not silently scrambled
    for key in (
        "llama_proj.weight",
        "visual_encoder.patch_embed.proj.weight",
        "llama_model.model.layers.0.mlp.gate_proj.weight",
    ):
        bad = dict(state)
        bad[key] = state[key].T.copy() if state[key].ndim == 2 else state[key].transpose(2, 3, 1, 0).copy()
        with pytest.raises(
            ConversionError,
            match=f"{key}: shape .*expected {tuple(state[key].shape)}".replace("(", r"\(").replace(")", r"\)"),
        ):
            load_state_dict(bad, rules, params)
    wrong = dict(state)
    wrong["llama_proj.bias"] = np.zeros(63, np.float32)
    with pytest.raises(ConversionError, match=r"llama_proj.bias: shape \(63,\)"):
        load_state_dict(wrong, rules, params)


AUDIO_PREFIXES = ib_ref.AUDIO_PREFIXES


def test_audio_branch_round_trips_through_the_original_layout(audio_model):
    """Import and export of the audio-branch keys (ImageBind's packed in_proj, bias_k/v, the Conv3d stem, the
    logit-scale buffer) are exact, key for key."""
    cfg, _, params, torch_branch = audio_model
    state = torch_branch.original_state_dict()
    rules = [r for r in video_llama_rules(cfg) if r.source.startswith(AUDIO_PREFIXES)]
    exported = export_state_dict(
        {k: v for k, v in params.items() if k.startswith("audio_")},
        rules,
        [p for p, _ in scanned_subtrees(cfg) if p.startswith("audio_")],
    )
    kept = {k: v for k, v in state.items() if not any(re.fullmatch(p, k) for p in UNUSED_KEYS)}
    assert exported.keys() == kept.keys()
    for key, value in kept.items():
        assert exported[key].shape == value.shape and np.array_equal(exported[key], value), key
