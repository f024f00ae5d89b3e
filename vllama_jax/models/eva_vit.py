"""EVA-CLIP ViT-g/14 as BLIP-2 (and so Video-LLaMA) uses it, plus the `ln_vision` LayerNorm that follows it.

Differences from a textbook ViT that change numbers: 39 blocks (EVA-CLIP-g has 40, BLIP-2 drops the last),
MLP width int(1408 × 4.3637) = 6144, attention with a query and a value bias but a fixed-zero key bias, exact
(erf) GELU, no final norm inside the tower. Blocks use LayerNorm eps 1e-6; `ln_vision` uses eps 1e-5.
Input frames are NHWC (B, H, W, 3), normalised with the CLIP mean/std; output is (B, 1 + patches, width).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllama_jax.models import layers


@dataclasses.dataclass(frozen=True)
class EvaVitConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    num_layers: int = 39
    num_heads: int = 16
    mlp_dim: int = 6144
    layer_norm_eps: float = 1e-6
    ln_vision_eps: float = 1e-5
    pos_embed_init_std: float = 0.02  # EVA's trunc-normal std; only a randomly initialised tower cares
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"  # layers.ATTENTION_IMPLS: 'xla', 'dot_product_attention', 'splash'

    def __post_init__(self):
        layers.check_attention_impl(self.attention_impl, "EvaVitConfig")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


class EvaAttention(nn.Module):
    config: EvaVitConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = layers.dtypes(cfg)
        heads = (cfg.num_heads, cfg.head_dim)
        q = layers.dense(heads, ("embed", "heads", "kv"), name="query", **kw)(x)
        k = layers.dense(heads, ("embed", "heads", "kv"), name="key", use_bias=False, **kw)(x)
        v = layers.dense(heads, ("embed", "heads", "kv"), name="value", **kw)(x)
        out = layers.attention(q, k, v, impl=cfg.attention_impl)
        return layers.dense(cfg.width, ("heads", "kv", "embed"), name="proj", num_in=2, **kw)(out)


class EvaBlock(nn.Module):
    """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    config: EvaVitConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = layers.dtypes(cfg)
        h = layers.layer_norm(cfg.layer_norm_eps, name="norm1", **kw)(x)
        x = x + EvaAttention(cfg, name="attn")(h)
        h = layers.layer_norm(cfg.layer_norm_eps, name="norm2", **kw)(x)
        h = layers.dense(cfg.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(h)
        h = nn.gelu(h, approximate=False)
        x = x + layers.dense(cfg.width, ("mlp", "embed"), name="fc2", **kw)(h)
        return nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED), None


class EvaVisionTransformer(nn.Module):
    """frames (B, H, W, 3) -> tokens (B, 1 + num_patches, width). ln_vision is a separate module (`ln_vision`)."""

    config: EvaVitConfig

    @nn.compact
    def __call__(self, frames):
        cfg = self.config
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        if frames.shape[-3:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"EVA ViT expects frames (..., {cfg.image_size}, {cfg.image_size}, 3), got {frames.shape}")
        patches = nn.Conv(
            cfg.width,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=layers.param_init(layers.normal(), (None, None, None, "embed")),
            bias_init=layers.param_init(jax.nn.initializers.zeros, ("embed",)),
            name="patch_embed",
        )(frames.astype(dtype))
        batch = patches.shape[0]
        tokens = patches.reshape(batch, -1, cfg.width)
        cls_token = self.param(
            "cls_token", layers.param_init(layers.normal(), (None, None, "embed")), (1, 1, cfg.width), param_dtype
        )
        pos_embed = self.param(
            "pos_embed",
            layers.param_init(layers.normal(cfg.pos_embed_init_std), (None, None, "embed")),
            (1, cfg.num_patches + 1, cfg.width),
            param_dtype,
        )
        cls = jnp.broadcast_to(jnp.asarray(cls_token, dtype), (batch, 1, cfg.width))
        x = jnp.concatenate([cls, tokens], axis=1) + jnp.asarray(pos_embed, dtype)
        x = nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED)
        blocks = layers.stack_layers(
            EvaBlock,
            cfg.num_layers,
            scan=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            name="blocks",
            num_broadcast_args=0,
            config=cfg,
        )
        return blocks(x)


def ln_vision(config: EvaVitConfig, name: str = "ln_vision") -> nn.LayerNorm:
    """The LayerNorm BLIP-2 puts after the ViT (eps 1e-5, unlike the blocks' 1e-6); a top-level module."""
    return layers.layer_norm(
        config.ln_vision_eps,
        name=name,
        **layers.dtypes(config),
    )

