"""LLaMA-family decoder (LLaMA-1/Vicuna, LLaMA-2-chat): the frozen LLM that reads Video-LLaMA's soft tokens.

RMSNorm, rotary embedding in Hugging Face's rotate-half layout (HF checkpoints already carry the permuted q/k
weights, so no permutation happens here), SwiGLU MLP, grouped-query attention, untied LM head.

Two ways to run it:
- full forward (`decode=False`): causal attention over the given sequence, keys masked by `padding_mask`.
- cached decoding (`decode=True`, `mutable=['cache']`): a static-shape KV cache per layer (sized by the input
  length at `init_cache` time) with a write index shared by the batch and a per-slot key mask, so prompts of
  different lengths can be left-padded. Rotary positions come from `positions`, independent of cache slots.
  Feeding more tokens than the cache holds gives NaN logits (the caller must size the cache).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllama_jax.models import layers


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"  # layers.ATTENTION_IMPLS: 'xla', 'dot_product_attention', 'splash'

    def __post_init__(self):
        layers.check_attention_impl(self.attention_impl, "LlamaConfig")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# The LLMs Video-LLaMA and Video-LLaVA read (vocabulary 32000 for all; LLaMA-1-based Vicuna v0 uses RMSNorm eps
# 1e-6, LLaMA-2 and Vicuna v1.5 1e-5), and the tiny one every CPU test and the CPU demo use.
SIZES = {
    "vicuna_7b": LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, rms_norm_eps=1e-6
    ),
    "vicuna_13b": LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40, rms_norm_eps=1e-6
    ),
    "llama2_7b_chat": LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5
    ),
    "llama2_13b_chat": LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40, rms_norm_eps=1e-5
    ),
    "tiny": LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rms_norm_eps=1e-5,
    ),
}


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, positions, theta: float):
    """x (B, S, H, D), positions (B, S) -> x rotated; angles in float32 as HF computes them."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    return x * cos + rotate_half(x) * sin


# Logical axes of the KV cache's variables (per layer; a scanned decoder adds a leading `layers` axis).
CACHE_AXES = {
    "cached_key": ("activation_batch", "activation_length", "kv_heads", "kv"),
    "cached_value": ("activation_batch", "activation_length", "kv_heads", "kv"),
    "cached_mask": ("activation_batch", "activation_length"),
    "cache_index": (),
}


class LlamaAttention(nn.Module):
    config: LlamaConfig
    decode: bool

    @nn.compact
    def __call__(self, x, positions, padding_mask):
        cfg = self.config
        kw = dict(layers.dtypes(cfg), use_bias=False)
        q = layers.dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv"), name="q_proj", **kw)(x)
        k = layers.dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), name="k_proj", **kw)(x)
        v = layers.dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), name="v_proj", **kw)(x)
        q = apply_rotary(q, positions, cfg.rope_theta)
        k = apply_rotary(k, positions, cfg.rope_theta)
        if self.decode:
            k, v, key_mask, query_slots = self._update_cache(k, v, padding_mask)
            key_slots = jnp.arange(k.shape[1])
            causal = key_slots[None, :] <= query_slots[:, None]
            allowed = causal[None, None] & key_mask[:, None, None, :].astype(bool)
            # the cache's causal mask is offset by the write index, which splash cannot express: einsum instead
            impl = "xla" if cfg.attention_impl == "splash" else cfg.attention_impl
            out = layers.attention(q, k, v, allowed, impl=impl)
            # writing past the cache's end would clamp and overwrite its last slots: make that loud, not wrong
            out = jnp.where(query_slots[-1] >= k.shape[1], jnp.nan, out)
        else:
            out = layers.attention(q, k, v, causal=True, key_mask=padding_mask, impl=cfg.attention_impl)
        return layers.dense(cfg.hidden_size, ("heads", "kv", "embed"), name="o_proj", num_in=2, **kw)(out)

    def _update_cache(self, k, v, padding_mask):
        """Write this call's keys/values at the cache index; return the whole cache and its key mask."""
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cached_mask = self.variable("cache", "cached_mask", jnp.zeros, padding_mask.shape, jnp.bool_)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        length = k.shape[1]
        if not initialized:  # the init call only creates the cache shapes
            return k, v, padding_mask, jnp.arange(length)
        index = cache_index.value
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, k.astype(cached_key.value.dtype), (0, index, 0, 0)
        )
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, v.astype(cached_value.value.dtype), (0, index, 0, 0)
        )
        cached_mask.value = jax.lax.dynamic_update_slice(cached_mask.value, padding_mask.astype(jnp.bool_), (0, index))
        cache_index.value = index + length
        for variable in (cached_key, cached_value, cached_mask):  # rows over the batch axes, heads over tensor
            variable.value = nn.with_logical_constraint(variable.value, CACHE_AXES[variable.name])
        return cached_key.value, cached_value.value, cached_mask.value, index + jnp.arange(length)


class LlamaBlock(nn.Module):
    config: LlamaConfig
    decode: bool

    @nn.compact
    def __call__(self, x, positions, padding_mask):
        cfg = self.config
        kw = layers.dtypes(cfg)
        h = layers.RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        x = x + LlamaAttention(cfg, self.decode, name="self_attn")(h, positions, padding_mask)
        h = layers.RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        gate = layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj", use_bias=False, **kw)(h)
        up = layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj", use_bias=False, **kw)(h)
        h = layers.dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj", use_bias=False, **kw)(nn.silu(gate) * up)
        return nn.with_logical_constraint(x + h, layers.BATCH_LENGTH_EMBED), None


class LlamaDecoder(nn.Module):
    """The transformer body: `layers_{i}` (or scanned `layers`) then the final RMSNorm `norm`."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, padding_mask, decode: bool):
        cfg = self.config
        blocks = layers.stack_layers(
            LlamaBlock,
            cfg.num_layers,
            scan=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            name="layers",
            num_broadcast_args=2,
            variable_axes=("params", "cache"),
            config=cfg,
            decode=decode,
        )
        x = blocks(x, positions, padding_mask)
        kw = layers.dtypes(cfg)
        return layers.RMSNorm(cfg.rms_norm_eps, name="norm", **kw)(x)


class LlamaForCausalLM(nn.Module):
    """input_ids or inputs_embeds (B, S[, hidden]) -> float32 logits (B, S, vocab).

    padding_mask (B, S): 1 for real tokens (default all ones). positions (B, S): rotary positions (default
    0..S-1; required when decoding).
    """

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            **layers.dtypes(cfg),
            embedding_init=layers.param_init(layers.normal(), ("vocab", "embed")),
        )
        self.decoder = LlamaDecoder(cfg)
        self.lm_head = layers.dense(
            cfg.vocab_size,
            ("embed", "vocab"),
            name=None,
            use_bias=False,
            **layers.dtypes(cfg),
        )

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(
        self,
        input_ids=None,
        inputs_embeds=None,
        padding_mask=None,
        positions=None,
        decode: bool = False,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(layers.dtype_of(self.config.dtype))
        batch, length = x.shape[:2]
        if padding_mask is None:
            padding_mask = jnp.ones((batch, length), jnp.bool_)
        if positions is None:
            if decode:
                raise ValueError("cached decoding needs explicit `positions` (rotary positions of the new tokens)")
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        x = nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED)
        x = self.decoder(x, positions, padding_mask, decode)
        return self.lm_head(x).astype(jnp.float32)


def init_cache(model: LlamaForCausalLM, params: Any, batch_size: int, max_length: int):
    """A zero KV cache of `max_length` slots for `batch_size` rows (shapes only; no forward pass is run)."""
    ids = jnp.zeros((batch_size, max_length), jnp.int32)
    shapes = jax.eval_shape(
        lambda: model.apply({"params": params}, ids, positions=ids, decode=True, mutable=["cache"])[1]
    )
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
