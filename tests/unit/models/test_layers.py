"""The shared building blocks (`models/layers.py`) against PyTorch: grouped-query attention with a mask against
`scaled_dot_product_attention`, LLaMA's RMSNorm against transformers' `LlamaRMSNorm`, the named-axis dense layer
against `nn.Linear`; and `stack_layers`' scanned and unrolled stacks computing the same thing."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from vllama_jax.models import layers
from vllama_jax.testing.torch_reference import max_abs, report


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_attention_matches_torch_sdpa(heads, kv_heads):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, heads, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 7, kv_heads, 8)).astype(np.float32) for _ in range(2))
    allowed = rng.random((2, 1, 5, 7)) > 0.3
    allowed[..., 0] = True  # every query sees at least one key
    ours = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed))
    repeat = heads // kv_heads  # PyTorch's reference repeats each key/value head for its query group
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2) for x in (q, np.repeat(k, repeat, 2), np.repeat(v, repeat, 2)))
    theirs = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.from_numpy(allowed))
    report(f"attention heads={heads} kv_heads={kv_heads}", max_abs(ours, theirs.transpose(1, 2).numpy()))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_matches_llama_rms_norm(dtype):
    x = np.random.default_rng(1).standard_normal((3, 4, 16)).astype(np.float32)
    scale = np.random.default_rng(2).standard_normal(16).astype(np.float32)
    norm = layers.RMSNorm(1e-5, dtype=jnp.dtype(dtype))
    ours = norm.apply({"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(x, dtype))
    theirs_module = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        theirs_module.weight.copy_(torch.from_numpy(scale))
        theirs = theirs_module(torch.from_numpy(x).to(getattr(torch, dtype))).float().numpy()
    assert ours.dtype == jnp.dtype(dtype)
    report(f"RMSNorm {dtype}", max_abs(ours, theirs), tol=1e-5 if dtype == "float32" else 2e-2)


def test_dense_matches_torch_linear_and_names_its_axes():
    x = np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32)
    dense = layers.dense((3, 4), ("embed", "heads", "kv"), name=None, dtype=jnp.float32, param_dtype=jnp.float32)
    boxed = dense.init(jax.random.key(0), jnp.asarray(x))["params"]
    assert boxed["kernel"].names == ("embed", "heads", "kv") and boxed["bias"].names == ("heads", "kv")
    params = nn.unbox(boxed)
    linear = torch.nn.Linear(5, 12)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.array(params["kernel"]).reshape(5, 12).T.copy()))
        linear.bias.copy_(torch.from_numpy(np.array(params["bias"]).reshape(12)))
        theirs = linear(torch.from_numpy(x)).numpy().reshape(2, 3, 4)
    report("dense (5 -> 3 x 4) vs nn.Linear", max_abs(dense.apply({"params": params}, jnp.asarray(x)), theirs))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, bias):
        return nn.tanh(nn.Dense(8, kernel_init=nn.initializers.normal(0.5))(x) + bias), None


class Stack(nn.Module):
    scan: bool
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x, bias):
        return layers.stack_layers(Block, 3, scan=self.scan, remat_policy=self.remat_policy, name="blocks",
                                   num_broadcast_args=1)(x, bias)


def test_scanned_and_unrolled_stacks_compute_the_same():
    x, bias = jnp.ones((2, 8)), jnp.full((8,), 0.1)
    unrolled = Stack(scan=False).init(jax.random.key(0), x, bias)["params"]
    stacked = {
        "blocks": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(unrolled[f"blocks_{i}"] for i in range(3)))
    }
    want = Stack(scan=False).apply({"params": unrolled}, x, bias)
    for policy in ("none", "full", "dots"):
        got = Stack(scan=True, remat_policy=policy).apply({"params": stacked}, x, bias)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    with pytest.raises(ValueError, match="remat_policy"):
        Stack(scan=False, remat_policy="sometimes").init(jax.random.key(0), x, bias)
