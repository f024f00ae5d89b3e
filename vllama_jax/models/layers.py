"""Building blocks shared by every tower: named-axis parameters, norms, attention, layer stacks.

Every parameter is created through `param_init(...)` so it carries logical axis names; `vllama_jax.sharding`
maps those names to mesh axes. No module here knows about a mesh.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Axes = tuple[str | None, ...]

# Activation axis names, used with `nn.with_logical_constraint` at block boundaries.
BATCH_LENGTH_EMBED: Axes = ("activation_batch", "activation_length", "activation_embed")


def dtype_of(name: str | Any) -> Any:
    """'bfloat16' / 'float32' / a numpy dtype -> jnp dtype (configs store dtypes as strings)."""
    return jnp.dtype(name) if isinstance(name, str) else name


def dtypes(config: Any) -> dict:
    """{'dtype', 'param_dtype'} keyword arguments from a tower config's dtype strings."""
    return dict(dtype=dtype_of(config.dtype), param_dtype=dtype_of(config.param_dtype))


def param_init(init: Callable, axes: Axes) -> Callable:
    """Wrap an initializer so the created parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, axes)


def normal(stddev: float = 0.02) -> Callable:
    return jax.nn.initializers.normal(stddev)


def torch_linear_uniform(fan_in: int) -> Callable:
    """PyTorch's default nn.Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weight and bias alike."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class DenseGeneral(nn.Module):
    """Linear map contracting the last `num_in` input dims; kernel shape (*input dims, *features).

    The kernel is created at its final shape so its logical axis names apply directly (flax's DenseGeneral
    initialises a flattened kernel and reshapes it, which trips sharding constraints under a mesh).
    """

    features: tuple[int, ...]
    axes: Axes
    num_in: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = normal()
    bias_init: Callable = jax.nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.num_in:]
        kernel = self.param(
            "kernel", param_init(self.kernel_init, self.axes), (*in_shape, *self.features), self.param_dtype
        )
        contract = (tuple(range(x.ndim - self.num_in, x.ndim)), tuple(range(self.num_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), jnp.asarray(kernel, self.dtype), (contract, ((), ())))
        if self.use_bias:
            bias_axes = self.axes[len(self.axes) - len(self.features) :]
            bias = self.param("bias", param_init(self.bias_init, bias_axes), self.features, self.param_dtype)
            y = y + jnp.asarray(bias, self.dtype)
        return y


def dense(
    features: int | Sequence[int],
    axes: Axes,
    *,
    name: str | None,
    dtype: Any,
    param_dtype: Any,
    use_bias: bool = True,
    num_in: int = 1,
    kernel_init: Callable | None = None,
    bias_init: Callable | None = None,
) -> DenseGeneral:
    """A linear layer whose kernel has logical axes `axes` (input axes first, then output axes)."""
    features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
    return DenseGeneral(
        features=features,
        axes=axes,
        num_in=num_in,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init or normal(),
        bias_init=bias_init or jax.nn.initializers.zeros,
        name=name,
    )


def layer_norm(eps: float, *, name: str, dtype: Any, param_dtype: Any, axis_name: str = "norm") -> nn.LayerNorm:
    """LayerNorm with statistics in float32 (flax's default), as PyTorch computes them in fp32 references."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=param_init(jax.nn.initializers.ones, (axis_name,)),
        bias_init=param_init(jax.nn.initializers.zeros, (axis_name,)),
        name=name,
    )


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in float32, cast back to the input dtype, then scale (HF's order)."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", param_init(jax.nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (jnp.asarray(scale, self.dtype) * x32.astype(self.dtype)).astype(self.dtype)


def attention(query, key, value, allowed=None, *, dropout: Callable | None = None):
    """Scaled dot-product attention with grouped key/value heads.

    query (B, Sq, H, D), key/value (B, Sk, K, D) with H a multiple of K; `allowed` broadcasts to (B, 1, Sq, Sk)
    (True = may attend). Scores and softmax run in float32; the result has the query's dtype.
    """
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    groups = num_heads // num_kv_heads
    q = query.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, key, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    if allowed is not None:
        # (B, 1, Sq, Sk) -> (B, 1, 1, Sq, Sk) to broadcast over (kv head, group).
        scores = jnp.where(allowed[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(value.dtype), value)
    return out.reshape(batch, q_len, num_heads, head_dim)


REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


def stack_layers(
    block: type[nn.Module],
    num: int,
    *,
    scan: bool,
    remat_policy: str,
    name: str,
    num_broadcast_args: int,
    variable_axes: Sequence[str] = ("params",),
    **block_kwargs,
) -> Callable:
    """Build `num` copies of `block` applied in sequence: `stack(x, *broadcast_args) -> x`.

    scan=True makes one scanned module whose parameters gain a leading `layers` axis (one compile of the
    block however deep the stack); scan=False makes modules `{name}_0 … {name}_{num-1}`. remat_policy is
    'none' or a key of REMAT_POLICIES. Blocks must have the signature `block(x, *broadcast_args) -> (x, None)`.
    """
    if remat_policy != "none":
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {remat_policy!r}: expected 'none' or one of {sorted(REMAT_POLICIES)}")
        block = nn.remat(block, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
        scanned = nn.scan(
            block,
            variable_axes={k: 0 for k in variable_axes},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * num_broadcast_args,
            length=num,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(name=name, **block_kwargs)

        def run_scanned(x, *args):
            x, _ = scanned(x, *args)
            return x

        return run_scanned

    layers = [block(name=f"{name}_{i}", **block_kwargs) for i in range(num)]

    def run_unrolled(x, *args):
        for layer in layers:
            x, _ = layer(x, *args)
        return x

    return run_unrolled
