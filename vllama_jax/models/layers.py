"""Building blocks shared by every tower: named-axis parameters, norms, attention, layer stacks.

Every parameter is created through `param_init(...)` so it carries logical axis names; `vllama_jax.sharding`
maps those names to mesh axes. No module here is given a mesh; only the splash-attention kernel reads the current
one, to split itself over it by the same logical names.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

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


# How attention is computed: every tower config's `attention_impl` names one of these (docs/model.md#attention).
ATTENTION_IMPLS = ("xla", "dot_product_attention", "splash")
# Splash attention works in (query block × key block) tiles whose sides are multiples of the TPU's 128 lanes;
# lengths are padded up to whole tiles, tiles grow with the length up to this side.
SPLASH_LANES = 128
SPLASH_MAX_BLOCK = 512


def check_attention_impl(impl: str, owner: str) -> None:
    """Refuse an unknown `attention_impl` early (at config time), naming the config and the valid values."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"{owner}.attention_impl={impl!r} is not an attention implementation: expected one of "
                         f"{list(ATTENTION_IMPLS)}")


def attention(query, key, value, allowed=None, *, causal: bool = False, key_mask=None, impl: str = "xla",
              dropout: Callable | None = None):
    """Scaled dot-product attention with grouped key/value heads, computed by `impl` (one of ATTENTION_IMPLS).

    query (B, Sq, H, D), key/value (B, Sk, K, D) with H a multiple of K. Which keys a query may see combines
    `causal` (query i sees keys 0..i), `key_mask` (B, Sk; True = a real key) and `allowed` (any mask that
    broadcasts to (B, 1, Sq, Sk), True = may attend). Scores and softmax run in float32; the result has the
    query's dtype. A query row with no key to see (a left-padding token) comes out finite but differs between
    implementations: callers ignore such rows.

    - 'xla': the einsum below, the reference the others are tested against;
    - 'dot_product_attention': `jax.nn.dot_product_attention`, cuDNN flash attention on a GPU in bfloat16 /
      float16, XLA's own attention elsewhere;
    - 'splash': the Pallas TPU splash-attention kernel (interpreted off TPU, which is slow: for tests). It takes
      `causal` and `key_mask` only; a general `allowed` mask is refused.
    `dropout` on the probabilities needs the probabilities, which only 'xla' forms: the others refuse it.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r}: expected one of {list(ATTENTION_IMPLS)}")
    if dropout is not None and impl != "xla":
        raise ValueError(f"attention dropout is applied to the attention probabilities, which attention_impl={impl!r}"
                         " never forms: set the tower's attention dropout to 0 or its attention_impl to 'xla'")
    if impl == "splash":
        if allowed is not None:
            raise ValueError("attention_impl='splash' takes its mask as `causal` and `key_mask`, not a general "
                             "`allowed` mask (a KV cache's offset causal mask has no splash kernel: use 'xla')")
        return _splash_attention(query, key, value, causal, key_mask)
    if impl == "dot_product_attention":
        # causal apart, so that cuDNN skips the masked-out half instead of reading it as a bias
        return _dot_product_attention(query, key, value, _combined_mask(allowed, key_mask), causal)
    causal_lengths = (query.shape[1], key.shape[1]) if causal else None
    return _einsum_attention(query, key, value, _combined_mask(allowed, key_mask, causal_lengths), dropout)


def _combined_mask(allowed, key_mask, causal_lengths: tuple[int, int] | None = None):
    """`allowed`, `key_mask` and, given (Sq, Sk), the causal mask as one boolean mask broadcasting to
    (B, 1, Sq, Sk); None when there is nothing to mask."""
    masks = [] if allowed is None else [allowed.astype(bool)]
    if causal_lengths is not None:
        q_len, kv_len = causal_lengths
        masks.append((jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None])[None, None])
    if key_mask is not None:
        masks.append(key_mask.astype(bool)[:, None, None, :])
    if not masks:
        return None
    combined = masks[0]
    for mask in masks[1:]:
        combined = combined & mask
    return combined


def _einsum_attention(query, key, value, allowed, dropout):
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


def _target_platform() -> str:
    """The platform the program is built for: the current mesh's devices (an ahead-of-time compile for abstract
    TPU devices runs on a CPU host), else JAX's default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def _dot_product_attention(query, key, value, allowed, causal: bool):
    # cuDNN's flash attention takes bfloat16 / float16 only; in float32 (and off GPU) XLA's path runs.
    on_cudnn = _target_platform() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16)
    return jax.nn.dot_product_attention(
        query, key.astype(query.dtype), value.astype(query.dtype), mask=allowed, is_causal=causal,
        implementation="cudnn" if on_cudnn else None,
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _splash_block(length: int) -> int:
    """The splash tile side for a sequence: the length rounded up to whole lanes, at most SPLASH_MAX_BLOCK."""
    return min(SPLASH_MAX_BLOCK, _round_up(length, SPLASH_LANES))


def _splash_attention(query, key, value, causal: bool, key_mask):
    """Splash attention over the batch: lengths padded to whole tiles, padding keys (and `key_mask`'s) masked by
    segment ids (every query is segment 1, a key is segment 1 if real, 0 if not), sharded over the mesh."""
    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1], key.shape[2]
    if causal and q_len != kv_len:
        raise ValueError(f"splash causal attention needs as many queries as keys, got {q_len} and {kv_len}")
    block_q, block_kv = _splash_block(q_len), _splash_block(kv_len)
    q_pad, kv_pad = _round_up(q_len, block_q) - q_len, _round_up(kv_len, block_kv) - kv_len

    def to_kernel_layout(x, pad):  # (B, S, heads, D) -> (B, heads, S + pad, D)
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    # the kernel does not scale the scores: scale the queries instead
    q = to_kernel_layout((query * head_dim**-0.5).astype(query.dtype), q_pad)
    k = to_kernel_layout(key.astype(query.dtype), kv_pad)
    v = to_kernel_layout(value.astype(query.dtype), kv_pad)
    real_keys = jnp.ones((batch, kv_len), bool) if key_mask is None else key_mask.astype(bool)
    query_segments = jnp.ones((batch, q_len + q_pad), jnp.int32)
    key_segments = jnp.pad(real_keys, ((0, 0), (0, kv_pad))).astype(jnp.int32)

    shape = (q_len + q_pad, kv_len + kv_pad)
    head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    blocks = splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv,
    )
    interpret = _target_platform() != "tpu"

    def per_shard(q, k, v, query_segments, key_segments):
        # built from the shard's own head count: under tensor parallelism a device holds some heads
        kernel = splash.make_splash_mha(
            splash.MultiHeadMask([head_mask] * q.shape[1]), block_sizes=blocks, head_shards=1, q_seq_shards=1,
            interpret=interpret,
        )
        return jax.vmap(kernel)(q, k, v, splash.SegmentIds(q=query_segments, kv=key_segments))

    out = _over_mesh(per_shard, batch, num_heads, num_kv_heads)(q, k, v, query_segments, key_segments)
    return out.transpose(0, 2, 1, 3)[:, :q_len]


def _over_mesh(per_shard: Callable, batch: int, num_heads: int, num_kv_heads: int) -> Callable:
    """`per_shard` mapped over the current mesh (a Pallas kernel is one device's program, so XLA cannot split it
    itself): examples split as `activation_batch` says, heads as `heads` says when `kv_heads` splits the same way
    and both divide; everything else replicated. Off a mesh, `per_shard` itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return per_shard

    def mesh_axes(logical_name: str, size: int):
        (axes,) = nn.logical_to_mesh_axes((logical_name,))
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = math.prod(mesh.shape[name] for name in names)
        return axes if ways > 1 and size % ways == 0 else None

    batch_axes = mesh_axes("activation_batch", batch)
    head_axes = mesh_axes("heads", num_heads)
    if head_axes != mesh_axes("kv_heads", num_kv_heads):
        head_axes = None
    heads_spec = PartitionSpec(batch_axes, head_axes, None, None)
    segments_spec = PartitionSpec(batch_axes, None)
    return jax.shard_map(
        per_shard, mesh=mesh, in_specs=(heads_spec,) * 3 + (segments_spec,) * 2, out_specs=heads_spec,
        check_vma=False,
    )


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
