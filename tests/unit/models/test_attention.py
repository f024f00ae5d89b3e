"""Attention implementations (`layers.attention`, a tower config's `attention_impl`): each equals the einsum path
('xla', the reference) in float32, forward and gradients, with padding masks and grouped-query attention;
'dot_product_attention' with `implementation=None` (XLA's attention on CPU), 'splash' as the Pallas TPU kernel in
interpret mode. Tolerance 2e-5 absolute (float32 summation order). Then the setting's way in: ml-collections
command-line overrides into every tower's config, splash split over a mesh of 8 simulated devices, the tiny
Video-LLaMA's loss through the kernels there, cached decoding falling back from splash, and the refusals."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from vllama_jax import sharding
from vllama_jax.config import model_config
from vllama_jax.models import layers
from vllama_jax.models.llama import SIZES, LlamaConfig, LlamaForCausalLM, init_cache
from vllama_jax.models.video_llama import VideoLlama, causal_lm_loss

TOLERANCE = 2e-5
FUSED = ["dot_product_attention", "splash"]


def qkv(q_len, kv_len, heads=4, kv_heads=2, head_dim=16, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(shape), jnp.float32)
            for shape in [(batch, q_len, heads, head_dim)] + [(batch, kv_len, kv_heads, head_dim)] * 2)


def output_and_grads(impl, query, key, value, sees_a_key, **mask):
    """The attention output and the gradients of a weighted sum of its rows that see at least one key (a row that
    sees none is padding, whose value each implementation chooses)."""
    weights = jnp.asarray(np.random.default_rng(9).standard_normal(query.shape), jnp.float32)

    def loss(q, k, v):
        out = layers.attention(q, k, v, impl=impl, **mask)
        return jnp.sum(jnp.where(sees_a_key[:, :, None, None], out * weights, 0.0)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(query, key, value)
    return out, grads


def assert_same_as_einsum(impl, query, key, value, sees_a_key, **mask):
    """`impl` against 'xla': finite everywhere, within TOLERANCE on the rows that see a key and on every gradient;
    prints the largest differences as parity figures (`pytest -s … | grep parity`)."""
    out, grads = output_and_grads(impl, query, key, value, sees_a_key, **mask)
    ref_out, ref_grads = output_and_grads("xla", query, key, value, sees_a_key, **mask)
    assert out.shape == ref_out.shape and bool(jnp.isfinite(out).all())
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    rows = np.asarray(sees_a_key)
    out_err = float(np.abs(np.asarray(out)[rows] - np.asarray(ref_out)[rows]).max())
    grad_err = max(float(jnp.abs(g - r).max()) for g, r in zip(grads, ref_grads))
    print(f"[parity] attention {impl} vs einsum ({', '.join(sorted(mask))}, q {query.shape[1]} x kv {key.shape[1]}):"
          f" max abs diff output {out_err:.2e}, gradients {grad_err:.2e}")
    assert out_err <= TOLERANCE and grad_err <= TOLERANCE


@pytest.mark.parametrize("impl", FUSED)
def test_causal_attention_with_padding_equals_einsum(impl):
    """The LLM's case: causal, a right-padded and a left-padded row, 4 query heads over 2 key/value heads; 20
    tokens, so splash pads them to one 128-token tile."""
    key_mask = np.ones((2, 20), bool)
    key_mask[0, 14:] = False  # right padding (training batches)
    key_mask[1, :3] = False  # left padding (prompts): its first three queries see no key
    sees_a_key = jnp.asarray(np.cumsum(key_mask, axis=1) > 0)
    assert_same_as_einsum(impl, *qkv(20, 20), sees_a_key, causal=True, key_mask=jnp.asarray(key_mask))


@pytest.mark.parametrize("impl", FUSED)
def test_non_causal_attention_with_fewer_queries_than_keys_equals_einsum(impl):
    """The towers' case: queries attending to a longer, partly masked context (Q-Former cross-attention;
    ImageBind's one extra key), grouped key/value heads."""
    key_mask = np.ones((2, 21), bool)
    key_mask[1, 15:] = False
    assert_same_as_einsum(impl, *qkv(6, 21, seed=1), jnp.ones((2, 6), bool), key_mask=jnp.asarray(key_mask))


def test_dot_product_attention_takes_a_general_mask():
    """Cached decoding's mask: 3 new queries at cache slots 4-6 of 8, causal from there, one slot never written."""
    slots = np.arange(8)
    allowed = (slots[None, :] <= 4 + np.arange(3)[:, None])[None, None] & (slots != 1)[None, None, None, :]
    allowed = jnp.asarray(np.broadcast_to(allowed, (2, 1, 3, 8)))
    assert_same_as_einsum("dot_product_attention", *qkv(3, 8, seed=2), jnp.ones((2, 3), bool), allowed=allowed)


def parse_config(*overrides):
    """The config as the command-line tools read it: ml-collections' config_flags with `--config.` overrides."""
    argv = ["test", "--config=configs/video_llama.py:llm=tiny", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


def test_command_line_overrides_reach_every_tower(monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)
    towers = ("vision", "qformer", "video_qformer", "llm", "imagebind_audio", "imagebind_vision", "audio_qformer")
    impls = dict(zip(towers, ["splash", "dot_product_attention"] * 4))
    config = parse_config("--config.model.equip_audio_branch=True",
                          *(f"--config.model.{t}.attention_impl={impl}" for t, impl in impls.items()))
    cfg = model_config(config)
    assert {t: getattr(cfg, t).attention_impl for t in towers} == impls
    # and each tower's attention is computed by its own setting: record the calls while tracing the model
    seen = []
    real_attention = layers.attention

    def recording(*args, impl="xla", **kwargs):
        seen.append(impl)
        return real_attention(*args, impl=impl, **kwargs)

    monkeypatch.setattr(layers, "attention", recording)
    frames, ids = jnp.zeros((1, 2, 28, 28, 3)), jnp.zeros((1, 6), jnp.int32)
    expected = {impl: 0 for impl in layers.ATTENTION_IMPLS}
    # ImageBind reads audio, or in the audio recipes the frames through its vision tower: one trace each
    for audio, modality, idle_tower in [(jnp.zeros((1, 2, 128, 204)), "audio", "imagebind_vision"),
                                        (frames, "vision", "imagebind_audio")]:
        jax.eval_shape(lambda: VideoLlama(cfg).init(jax.random.key(0), frames, ids, audio=audio,
                                                    audio_modality=modality))
        for tower in set(towers) - {idle_tower}:
            tower_cfg = getattr(cfg, tower)
            calls = tower_cfg.num_layers
            if tower.endswith("qformer"):  # self-attention per layer, cross-attention every cross_attention_freq
                calls += tower_cfg.num_layers // tower_cfg.cross_attention_freq
            expected[impls[tower]] += calls
    assert {impl: seen.count(impl) for impl in layers.ATTENTION_IMPLS} == expected


def test_splash_on_a_mesh_runs_per_device():
    """On a (data 2, fsdp 2, tensor 2) mesh splash runs once per device (batch over data × fsdp, heads over tensor,
    as the rules table says): the same output and gradients."""
    key_mask = np.ones((4, 20), bool)
    key_mask[1, 12:] = False
    with jax.set_mesh(sharding.make_mesh((2, 2, 2))), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        assert_same_as_einsum("splash", *qkv(20, 20, batch=4, seed=4), jnp.ones((4, 20), bool), causal=True,
                              key_mask=jnp.asarray(key_mask))


def test_video_llama_through_the_kernels_on_a_mesh(tiny, monkeypatch, repo_root):
    """The tiny Video-LLaMA with its towers' attention set from the command line (the LLM and the frozen Q-Former
    on splash, the ViT and the trained video Q-Former on dot_product_attention), on a (data 2, fsdp 2, tensor 2)
    mesh, with a padded row: the same loss as the einsum path."""
    monkeypatch.chdir(repo_root)
    _, params, frames, ids, labels = tiny
    impls = {"llm": "splash", "qformer": "splash", "vision": "dot_product_attention",
             "video_qformer": "dot_product_attention"}
    cfg = dataclasses.replace(
        model_config(parse_config(*(f"--config.model.{t}.attention_impl={impl}" for t, impl in impls.items()))),
        image_token_id=511,
    )
    padding_mask = np.ones(ids.shape, bool)
    padding_mask[1, -2:] = False
    labels = np.where(padding_mask, labels, -100)
    frames, ids, labels, padding_mask = (np.concatenate([x, x]) for x in (frames, ids, labels, padding_mask))

    def loss(model_cfg):
        def loss_of(p):
            logits, _ = VideoLlama(model_cfg).apply({"params": p}, frames, ids, padding_mask)
            return causal_lm_loss(logits, labels)[0]

        with jax.set_mesh(sharding.make_mesh((2, 2, 2))), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            return float(jax.jit(loss_of)(params))

    reference = dataclasses.replace(cfg, **{t: dataclasses.replace(getattr(cfg, t), attention_impl="xla")
                                            for t in impls})
    assert abs(loss(cfg) - loss(reference)) < TOLERANCE


def test_cached_decoding_with_splash_falls_back_to_einsum():
    """A KV cache's offset causal mask has no splash kernel: decoding with `splash` set gives the einsum's logits."""
    cfg = SIZES["tiny"]
    model, splash_model = LlamaForCausalLM(cfg), LlamaForCausalLM(dataclasses.replace(cfg, attention_impl="splash"))
    ids = jnp.asarray(np.random.default_rng(3).integers(3, 500, (2, 5)), jnp.int32)
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), ids)["params"]))()
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))

    def decode(m):
        cache = init_cache(m, params, batch_size=2, max_length=8)
        return jax.jit(lambda c: m.apply({"params": params, "cache": c}, ids, positions=positions, decode=True,
                                         mutable=["cache"])[0])(cache)

    np.testing.assert_array_equal(decode(splash_model), decode(model))


def test_refusals_name_the_setting_and_the_choices(monkeypatch, repo_root):
    with pytest.raises(ValueError, match=r"LlamaConfig.attention_impl='flash'.*'xla', 'dot_product_attention', "
                                         r"'splash'"):
        LlamaConfig(attention_impl="flash")
    monkeypatch.chdir(repo_root)
    with pytest.raises(ValueError, match=r"EvaVitConfig.attention_impl='flash'"):
        model_config(parse_config("--config.model.vision.attention_impl=flash"))
    q, k, v = qkv(4, 4)
    with pytest.raises(ValueError, match="dropout"):
        layers.attention(q, k, v, impl="dot_product_attention", dropout=lambda p: p)
    with pytest.raises(ValueError, match="splash.*causal.*key_mask"):
        layers.attention(q, k, v, jnp.ones((2, 1, 4, 4), bool), impl="splash")
