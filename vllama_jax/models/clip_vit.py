"""CLIP ViT-L/14 as Video-LLaVA's LanguageBind towers use it: the image tower, and the video tower with a residual
temporal self-attention in every layer.

Both towers are Hugging Face's `CLIPVisionTransformer` layout: patch embedding (no bias) → prepend
`class_embedding` → + `position_embedding` → `pre_layrnorm` (the original's spelling) → pre-LN layers
(`layer_norm1` → `self_attn` → add, `layer_norm2` → `fc1` → activation → `fc2` → add). The activation is the
checkpoint config's `hidden_act`: `quick_gelu` (x·σ(1.702x), HF's default) or `gelu` (exact erf).

Video-LLaVA reads the hidden state `select_layer` (-2: the penultimate layer's output), so the last layer and
`post_layernorm` never change its output. They are still parameters here (`unused_layers_*`, `post_layernorm`),
created at init only and never run, so that a checkpoint converts and round-trips key for key.

The video tower (`temporal_attention=True`, LanguageBind_Video_merge's `add_time_attn`): frames (B, T, H, W, 3)
run as B·T images, and each layer first adds `temporal_embedding[:, :T]` over the frame axis (only when
`num_frames != 1`, as the original checks its config, not the input) and then adds a temporal self-attention
(`temporal_layer_norm1` → `temporal_attn`) across the T frames of each token position, before the spatial block.
With `temporal_attention=False` it is transformers' `VideoLlavaForConditionalGeneration` video tower.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllama_jax.models import layers

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class ClipVitConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # which hidden state the model reads (HF's `hidden_states` index: 0 = after pre_layrnorm, -1 = the last layer)
    select_layer: int = -2
    # LanguageBind_Video_merge's temporal layers (`add_time_attn`); num_frames sizes temporal_embedding and is
    # the number of frames a video must have
    temporal_attention: bool = False
    num_frames: int = 8
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r}: expected one of {sorted(ACTIVATIONS)}")
        if not -self.num_layers - 1 <= self.select_layer <= self.num_layers:
            raise ValueError(f"select_layer {self.select_layer} is outside the {self.num_layers + 1} hidden states")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def used_layers(self) -> int:
        """How many layers run: hidden state `select_layer` is the output of that many."""
        return self.select_layer % (self.num_layers + 1)


class ClipAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections, no mask (HF's CLIPAttention on vision)."""

    config: ClipVitConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = layers.dtypes(cfg)
        heads = (cfg.num_heads, cfg.head_dim)
        q = layers.dense(heads, ("embed", "heads", "kv"), name="q_proj", **kw)(x)
        k = layers.dense(heads, ("embed", "heads", "kv"), name="k_proj", **kw)(x)
        v = layers.dense(heads, ("embed", "heads", "kv"), name="v_proj", **kw)(x)
        out = layers.attention(q, k, v)
        return layers.dense(cfg.width, ("heads", "kv", "embed"), name="out_proj", num_in=2, **kw)(out)


class ClipLayer(nn.Module):
    """One encoder layer on x (B·T, tokens, width); with temporal attention, the temporal step comes first."""

    config: ClipVitConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = layers.dtypes(cfg)
        if cfg.temporal_attention:
            x = self._temporal(x)
        h = layers.layer_norm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + ClipAttention(cfg, name="self_attn")(h)
        h = layers.layer_norm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        h = layers.dense(cfg.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(h)
        h = ACTIVATIONS[cfg.hidden_act](h)
        x = x + layers.dense(cfg.width, ("mlp", "embed"), name="fc2", **kw)(h)
        return nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED), None

    def _temporal(self, x):
        """+ temporal_embedding over the frame axis, then x + temporal_attn(temporal_layer_norm1(x)) across the
        frames of each token position."""
        cfg = self.config
        kw = layers.dtypes(cfg)
        frames, (batch_frames, tokens, width) = cfg.num_frames, x.shape
        video = x.reshape(batch_frames // frames, frames, tokens, width)
        embedding = self.param(
            "temporal_embedding",
            layers.param_init(layers.normal(cfg.width**-0.5), (None, None, "embed")),
            (1, frames, width),
            layers.dtype_of(cfg.param_dtype),
        )
        if frames != 1:
            video = video + jnp.asarray(embedding, video.dtype)[:, :, None, :]
        across_frames = video.transpose(0, 2, 1, 3).reshape(-1, frames, width)  # (B·tokens, T, width)
        h = layers.layer_norm(cfg.layer_norm_eps, name="temporal_layer_norm1", **kw)(across_frames)
        h = ClipAttention(cfg, name="temporal_attn")(h)
        h = h.reshape(-1, tokens, frames, width).transpose(0, 2, 1, 3)
        return (video + h).reshape(batch_frames, tokens, width)


class ClipVisionTower(nn.Module):
    """frames (N, H, W, 3) (or (B, T, H, W, 3) for a video tower), CLIP-normalised, NHWC -> hidden state
    `select_layer` (N, 1 + patches, width) (videos: (B, T, 1 + patches, width)), CLS first."""

    config: ClipVitConfig

    @nn.compact
    def __call__(self, frames):
        cfg = self.config
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        if frames.shape[-3:] != (cfg.image_size, cfg.image_size, 3):
            size = cfg.image_size
            raise ValueError(f"CLIP ViT expects frames (..., {size}, {size}, 3), got {frames.shape}")
        video_shape = frames.shape[:-3]
        if cfg.temporal_attention and (len(video_shape) != 2 or video_shape[1] != cfg.num_frames):
            raise ValueError(
                f"the temporal video tower reads videos of exactly num_frames={cfg.num_frames} frames, "
                f"(B, {cfg.num_frames}, H, W, 3); got {frames.shape}"
            )
        x = self._embeddings(frames.reshape(-1, *frames.shape[-3:]).astype(dtype), dtype, param_dtype)
        x = layers.layer_norm(cfg.layer_norm_eps, name="pre_layrnorm", **layers.dtypes(cfg))(x)
        stack = dict(scan=cfg.scan_layers, remat_policy=cfg.remat_policy, num_broadcast_args=0, config=cfg)
        x = layers.stack_layers(ClipLayer, cfg.used_layers, name="layers", **stack)(x)
        if self.is_initializing():  # parameters only: see the module docstring
            unused = cfg.num_layers - cfg.used_layers
            tail = layers.stack_layers(ClipLayer, unused, name="unused_layers", **stack)(x) if unused else x
            layers.layer_norm(cfg.layer_norm_eps, name="post_layernorm", **layers.dtypes(cfg))(tail[:, 0])
        return x.reshape(*video_shape, *x.shape[1:])

    def _embeddings(self, images, dtype, param_dtype):
        cfg = self.config
        patches = nn.Conv(
            cfg.width,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=layers.param_init(layers.normal(), (None, None, None, "embed")),
            name="patch_embedding",
        )(images)
        count = images.shape[0]
        tokens = patches.reshape(count, -1, cfg.width)
        class_embedding = self.param(
            "class_embedding", layers.param_init(layers.normal(cfg.width**-0.5), ("embed",)), (cfg.width,), param_dtype
        )
        position_embedding = self.param(
            "position_embedding",
            layers.param_init(layers.normal(), (None, "embed")),
            (cfg.num_patches + 1, cfg.width),
            param_dtype,
        )
        cls = jnp.broadcast_to(jnp.asarray(class_embedding, dtype), (count, 1, cfg.width))
        x = jnp.concatenate([cls, tokens], axis=1) + jnp.asarray(position_embedding, dtype)
        return nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED)
