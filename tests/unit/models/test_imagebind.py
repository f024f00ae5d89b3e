"""ImageBind-huge's audio and vision towers (`models/imagebind.py`) against the real ImageBind code
(imagebind-unofficial, `vllama_jax/testing/imagebind_reference.py`), fp32, max abs diff <= 1e-5; drop path as the
original's; full sizes by shape."""
import dataclasses
import re
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vllama_jax.config import load_config, model_config
from vllama_jax.convert import imagebind as ib_map
from vllama_jax.convert.mapping import flatten, torch_shape
from vllama_jax.convert.video_llama import (
    load_state_dict,
    scanned_subtrees,
    video_llama_rules,
)
from vllama_jax.models.imagebind import ImageBindEncoder
from vllama_jax.models.video_llama import AUDIO_TRAINABLE, VideoLlama, count_params, init_params
from vllama_jax.testing import imagebind_reference as ib_ref
from vllama_jax.testing import torch_reference as ref
from vllama_jax.testing.torch_reference import report


@pytest.fixture(scope="module")
def tiny_imagebind():
    return ib_ref.tiny_imagebind(seed=0)


@pytest.mark.parametrize("scan", [False, True])
def test_imagebind_towers_match_the_original(tiny_imagebind, scan):
    torch_model, audio_cfg, vision_cfg = tiny_imagebind
    audio_cfg = dataclasses.replace(audio_cfg, scan_layers=scan)
    vision_cfg = dataclasses.replace(vision_cfg, scan_layers=scan)
    encoder = ImageBindEncoder(audio_cfg, vision_cfg)
    rng = np.random.default_rng(0)
    fbank = rng.standard_normal((2, 3, 128, 204)).astype(np.float32)
    frames = rng.standard_normal((2, 2, 224, 224, 3)).astype(np.float32)
    abstract = jax.eval_shape(lambda: {
        **encoder.init(jax.random.key(0), fbank, "audio")["params"],
        **encoder.init(jax.random.key(0), frames, "vision")["params"]})
    scanned = [(f"{m}/blocks", 2) for m in ("audio", "vision")] if scan else []
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params = load_state_dict(state, ib_map.imagebind_rules(audio_cfg, vision_cfg), abstract, scanned,
                             ignore=ib_map.UNUSED_KEYS)
    with torch.no_grad():
        t_feature, t_embedding = ib_ref.get_audio_feature(torch_model, torch.from_numpy(fbank)[:, :, None], "audio")
        t_vfeature, t_vembedding = ib_ref.get_audio_feature(
            torch_model, torch.from_numpy(frames).permute(0, 1, 4, 2, 3).contiguous(), "vision")
    feature, embedding = encoder.apply({"params": params}, fbank, "audio")
    vfeature, vembedding = encoder.apply({"params": params}, frames, "vision")
    assert feature.shape == (2, 3, 32) and embedding.shape == (2, 3, 48)
    report(f"ImageBind audio head-LN CLS (scan={scan})", ref.max_abs(feature, t_feature))
    report(f"ImageBind audio embedding x20 (scan={scan})", ref.max_abs(embedding, t_embedding))
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 20.0, rtol=1e-5)
    report(f"ImageBind vision head-LN CLS (scan={scan})", ref.max_abs(vfeature, t_vfeature))
    report(f"ImageBind vision embedding (scan={scan})", ref.max_abs(vembedding, t_vembedding))
    np.testing.assert_allclose(np.linalg.norm(vembedding, axis=-1), 1.0, rtol=1e-5)  # no logit scale for vision


def test_drop_path_only_in_training_and_only_where_the_original_has_it(tiny_imagebind):
    torch_model, audio_cfg, vision_cfg = tiny_imagebind
    encoder = ImageBindEncoder(audio_cfg, vision_cfg)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 2, 128, 204)).astype(np.float32)
    frames = rng.standard_normal((4, 2, 224, 224, 3)).astype(np.float32)
    params = {**encoder.init(jax.random.key(0), x, "audio")["params"],
              **encoder.init(jax.random.key(0), frames, "vision")["params"]}
    run = lambda inputs, modality, det, seed: np.asarray(encoder.apply(  # noqa: E731
        {"params": params}, inputs, modality, deterministic=det, rngs={"dropout": jax.random.key(seed)})[0])
    assert np.array_equal(run(x, "audio", True, 0), run(x, "audio", True, 1))
    assert not np.allclose(run(x, "audio", False, 0), run(x, "audio", True, 0))  # block 1 of 2 drops at rate 0.1
    # the original's vision trunk has no drop path (imagebind_model.py builds it with drop_path=0.0)
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in torch_model.modality_trunks["vision"].blocks)
    assert vision_cfg.drop_path == 0.0
    np.testing.assert_array_equal(run(frames, "vision", False, 0), run(frames, "vision", True, 0))


@pytest.mark.parametrize("scan", [False, True])
def test_drop_path_rate_of_block_i_is_the_originals_linspace(scan):
    """Block i drops its residual branches with probability drop_path · i / (L − 1): measured per block over 4000
    samples, against the per-block rates of the real ImageBind's audio trunk (torch.linspace(0, 0.1, L))."""
    from vllama_jax.models.imagebind import ImageBindTower

    num_blocks, samples = 5, 4000
    torch_model, audio_cfg, _ = ib_ref.tiny_imagebind(seed=0, audio_num_blocks=num_blocks)
    expected = [getattr(b.drop_path, "drop_prob", 0.0) for b in torch_model.modality_trunks["audio"].blocks]
    np.testing.assert_allclose(expected, np.linspace(0, 0.1, num_blocks), atol=1e-7)
    # a 2 × 2-patch input keeps 4000 samples cheap; the rate does not depend on the input size
    cfg = dataclasses.replace(audio_cfg, input_size=(26, 26), width=16, num_heads=2, mlp_dim=32, out_dim=8)
    tower = ImageBindTower(dataclasses.replace(cfg, scan_layers=False))
    x = np.random.default_rng(2).standard_normal((samples, 26, 26)).astype(np.float32)
    base = jax.tree_util.tree_map(np.asarray, nn.unbox(tower.init(jax.random.key(0), x[:1])["params"]))
    zero = lambda tree: jax.tree_util.tree_map(np.zeros_like, tree)  # noqa: E731

    def only_attention_of(block):
        """Every residual branch zero but block `block`'s attention: a sample's output equals the all-zero
        tower's exactly when that branch was dropped."""
        params = dict(base)
        for i in range(num_blocks):
            params[f"blocks_{i}"] = {**base[f"blocks_{i}"], "fc2": zero(base[f"blocks_{i}"]["fc2"])}
            if i != block:
                attn = base[f"blocks_{i}"]["attn"]
                params[f"blocks_{i}"]["attn"] = {**attn, "out_proj": zero(attn["out_proj"])}
        if scan:  # the scanned layout: one `blocks` subtree, a leading layers axis
            stacked = [params.pop(f"blocks_{i}") for i in range(num_blocks)]
            params["blocks"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *stacked)
        return params

    model = ImageBindTower(dataclasses.replace(cfg, scan_layers=scan))
    run = jax.jit(lambda p, det: model.apply({"params": p}, x, det, rngs={"dropout": jax.random.key(3)})[0],
                  static_argnums=1)
    all_zero = np.asarray(run(only_attention_of(-1), True))
    measured = []
    for block in range(num_blocks):
        trained = np.asarray(run(only_attention_of(block), False))
        measured.append(float(np.all(trained == all_zero, axis=-1).mean()))
    print(
        f"[drop path] per-block drop rate (scan={scan}): measured {np.round(measured, 4)}, "
        f"original {np.round(expected, 4)}"
    )
    assert measured[0] == 0.0  # block 0 never drops
    np.testing.assert_allclose(measured, expected, atol=0.02)  # 4000 samples: std ≤ 0.005


def _patched_init():
    """Build the full-size original without spending a minute initialising 1.2 B random weights."""
    names = [
        "kaiming_uniform_",
        "uniform_",
        "xavier_uniform_",
        "xavier_normal_",
        "normal_",
        "constant_",
        "trunc_normal_",
    ]
    return [mock.patch(f"torch.nn.init.{n}", lambda t, *a, **k: t) for n in names]


def test_full_size_imagebind_and_audio_glue_by_shape():
    """The full-size towers and audio glue by jax.eval_shape, against SPEC's counts and the real imagebind_huge's
    every tensor shape (every key of it mapped or dropped on purpose)."""
    cfg = model_config(load_config("configs/video_llama.py:llama2_7b_chat,audio_stage1"))
    params = nn.unbox(jax.eval_shape(lambda: init_params(VideoLlama(cfg), jax.random.key(0))))
    audio_tower = flatten(params["audio_encoder"]["audio"])
    assert sum(int(np.prod(v.shape)) for k, v in audio_tower.items() if k != "log_logit_scale") == 86_235_648
    assert audio_tower["log_logit_scale"].shape == ()  # the fixed buffer, kept so the file round-trips
    assert count_params(params, ("audio_Qformer",)) == 19_691_520
    assert count_params(params, AUDIO_TRAINABLE) == 19_691_520 + 8 * 768 + 8 * 1024 + 768 * 4096 + 4096
    assert params["audio_encoder"]["vision"]["blocks"]["attn"]["query"]["kernel"].dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params["audio_Qformer"]))
    model = VideoLlama(cfg)
    for inputs, modality in (((1, 8, 1, 128, 204), "audio"), ((1, 8, 224, 224, 3), "vision")):
        soft = jax.eval_shape(
            lambda p, x: model.apply({"params": p}, x, modality, method=VideoLlama.encode_audio),
            params,
            jax.ShapeDtypeStruct(inputs, jnp.float32),
        )
        assert soft.shape == (1, 8, 4096), (modality, soft.shape)

    patches = _patched_init()
    for p in patches:
        p.start()
    try:
        huge = ib_ref.imagebind_model().imagebind_huge()
    finally:
        for p in patches:
            p.stop()
    real = {k: tuple(v.shape) for k, v in huge.state_dict().items()}
    assert sum(int(np.prod(s)) for k, s in real.items() if ".vision." in k) == sum(
        int(np.prod(v.shape)) for v in flatten(params["audio_encoder"]["vision"]).values()
    )
    shapes = {f"audio_encoder/{k}": v.shape for k, v in flatten(params["audio_encoder"]).items()}
    shapes = {k: v for k, v in _unscanned(shapes, cfg).items()}
    rules = [r for r in video_llama_rules(cfg) if r.source.startswith("audio_encoder.")]
    mapped = set()
    for rule in rules:
        key = rule.source.removeprefix("audio_encoder.")
        mapped.add(key)
        if rule.transform.startswith("split3"):
            piece = "linear" if rule.transform == "split3" else "bias"
            want = torch_shape(piece, shapes[rule.targets[0]])
            want = (3 * want[0], *want[1:])
        else:
            want = torch_shape(rule.transform, shapes[rule.target])
        assert real[key] == want, key
    unused = [k for k in real if k not in mapped]
    assert unused and all(re.fullmatch(p, k) for k in unused for p in ib_map.UNUSED_KEYS)
    assert {k.split(".")[1] for k in unused} == {"text", "depth", "thermal", "imu"}


def _unscanned(shapes, cfg):
    out = {}
    for key, shape in shapes.items():
        for path, count in scanned_subtrees(cfg):
            if key.startswith(path + "/"):
                for i in range(count):
                    out[f"{path}_{i}/{key[len(path) + 1 :]}"] = shape[1:]
                break
        else:
            out[key] = shape
    return out
