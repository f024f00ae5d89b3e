"""The LLaMA decoder (`models/llama.py`): logits against transformers' LlamaForCausalLM (MHA, GQA, padding, scan),
cached decoding against the full forward, a cache overflow made loud; the full-size LLMs' counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vllama_jax.config import load_config, model_config
from vllama_jax.convert import llama as llama_map
from vllama_jax.convert.mapping import prefixed
from vllama_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_cache
from vllama_jax.models.video_llama import count_params
from vllama_jax.testing import torch_reference as ref
from vllama_jax.testing.torch_reference import load, report


def llama_pair(kv_heads, scan):
    torch_model = ref.llama_lm(kv_heads=kv_heads)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
        rms_norm_eps=1e-5, scan_layers=scan,
    )
    ids = np.zeros((2, 4), np.int32)
    rules = prefixed(llama_map.llama_rules(cfg), "llama_model.", "")
    scanned = [("decoder/layers", 2)] if scan else []
    params = load(LlamaForCausalLM(cfg), (ids,), ref.llama_state_dict(torch_model), rules, scanned)
    return torch_model, cfg, params


def hf_logits(torch_model, ids, mask, positions=None):
    with torch.no_grad():
        out = torch_model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=None if positions is None else torch.from_numpy(positions).long(),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("kv_heads,scan", [(4, False), (2, False), (2, True)])
def test_llama_logits_parity(kv_heads, scan):
    torch_model, cfg, params = llama_pair(kv_heads, scan)
    model = LlamaForCausalLM(cfg)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 512, (2, 11)).astype(np.int32)
    name = f"LLaMA kv_heads={kv_heads} scan={scan}"
    full = np.ones((2, 11), bool)
    report(f"{name} no padding", ref.max_abs(model.apply({"params": params}, ids), hf_logits(torch_model, ids, full)))
    right = full.copy()
    right[1, 7:] = False
    ours = np.asarray(model.apply({"params": params}, ids, padding_mask=right))
    report(f"{name} right padding", ref.max_abs(ours[right], hf_logits(torch_model, ids, right)[right]))
    left = full.copy()
    left[0, :4] = False
    positions = np.maximum(np.cumsum(left, axis=1) - 1, 0)
    ours = np.asarray(model.apply({"params": params}, ids, padding_mask=left, positions=positions))
    report(f"{name} left padding", ref.max_abs(ours[left], hf_logits(torch_model, ids, left, positions)[left]))


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_reproduces_full_forward(scan):
    _, cfg, params = llama_pair(2, scan)
    model = LlamaForCausalLM(cfg)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 512, (2, 12)).astype(np.int32)
    mask = np.ones((2, 12), bool)
    mask[1, :3] = False  # row 1: a shorter prompt, left-padded
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    full = np.asarray(model.apply({"params": params}, ids, padding_mask=mask, positions=positions))

    step = jax.jit(
        lambda p, cache, tok, m, pos: model.apply(
            {"params": p, "cache": cache}, tok, padding_mask=m, positions=pos, decode=True, mutable=["cache"]
        )
    )
    cache = init_cache(model, params, batch_size=2, max_length=16)
    prompt = 7
    logits, state = step(params, cache, ids[:, :prompt], mask[:, :prompt], positions[:, :prompt])
    errors = [ref.max_abs(np.asarray(logits)[mask[:, :prompt]], full[:, :prompt][mask[:, :prompt]])]
    cache = state["cache"]
    for t in range(prompt, 12):
        logits, state = step(params, cache, ids[:, t : t + 1], mask[:, t : t + 1], positions[:, t : t + 1])
        cache = state["cache"]
        errors.append(ref.max_abs(logits[:, 0], full[:, t]))
        assert (np.asarray(logits[:, 0]).argmax(-1) == full[:, t].argmax(-1)).all()
    report(f"cached decoding vs full forward (scan={scan})", max(errors))


def test_cache_overflow_is_loud_not_wrong():
    _, cfg, params = llama_pair(2, False)
    model = LlamaForCausalLM(cfg)
    cache = init_cache(model, params, batch_size=1, max_length=4)
    ids = np.arange(3, 9, dtype=np.int32)[None]
    step = lambda cache, tok, pos: model.apply(  # noqa: E731
        {"params": params, "cache": cache}, tok, positions=pos, decode=True, mutable=["cache"]
    )
    logits, state = step(cache, ids[:, :4], np.arange(4)[None])
    assert np.isfinite(np.asarray(logits)).all()
    logits, _ = step(state["cache"], ids[:, 4:5], np.array([[4]]))  # a fifth token into a 4-slot cache
    assert np.isnan(np.asarray(logits)).all()


@pytest.mark.parametrize(
    "name,expected",
    [
        ("llama2_7b_chat", 6_738_415_616),
        ("vicuna_7b", 6_738_415_616),
        ("llama2_13b_chat", 13_015_864_320),
        ("vicuna_13b", 13_015_864_320),
    ],
)
def test_llm_counts(repo_root, name, expected):
    cfg = model_config(load_config(f"{repo_root}/configs/video_llama.py:{name}")).llm
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = jax.eval_shape(lambda i: LlamaForCausalLM(cfg).init(jax.random.key(0), i)["params"], ids)
    assert count_params(params) == expected
