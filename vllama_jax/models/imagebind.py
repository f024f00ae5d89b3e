"""ImageBind-huge's audio and vision encoders, the two towers Video-LLaMA's audio branch reads (`audio_encoder.`).

One tower type serves both modalities; they differ only in data (SPEC §4):
- audio: fbank (N, 128, 204) → Conv2d(1→768, kernel 16, stride 10, no bias) → LayerNorm (eps 1e-5) → 228 patches;
  attention appends a learned extra key and value token (`bias_k` / `bias_v`, PyTorch's add_bias_kv); drop
  path linspace(0, 0.1, 12) in training; embedding L2-normalised then × exp(log_logit_scale) = 20.
- vision: frames (N, 224, 224, 3) → each frame repeated twice in time → Conv3d(3→1280, kernel (2, 14, 14),
  no bias) → 256 patches; a LayerNorm (eps 1e-6) before the blocks; embedding L2-normalised only (no scale).
Both: CLS token + learned position embedding → pre-LN blocks (LN eps 1e-6, exact GELU, MLP 4× width) → head
LayerNorm → CLS → Linear(width → 1024, no bias). A tower returns `(feature, embedding)`: the head-LN CLS
(width) and the postprocessed 1024-d vector, the pair Video-LLaMA's `get_audio_feature` returns.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllama_jax.models import layers


@dataclasses.dataclass(frozen=True)
class ImageBindTowerConfig:
    modality: str = "audio"  # "audio" (fbank input) or "vision" (RGB frames)
    input_size: tuple[int, int] = (128, 204)  # audio: (mel bins, fbank frames); vision: (height, width)
    kernel_size: tuple[int, ...] = (16, 16)  # vision: (2, 14, 14), time first
    stride: tuple[int, ...] = (10, 10)
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    out_dim: int = 1024
    stem_norm_eps: float = 1e-5  # LayerNorm after the stem (audio); 0 = none (vision)
    pre_transformer_norm: bool = False  # LayerNorm before the blocks (vision)
    add_bias_kv: bool = True  # the learned extra key/value token (audio)
    drop_path: float = 0.1  # the last block's drop-path rate; block i uses drop_path * i / (num_layers - 1)
    logit_scale: bool = True  # × exp(log_logit_scale) after normalising (audio: 20, a fixed buffer)
    layer_norm_eps: float = 1e-6
    pos_embed_init_std: float = 0.0  # 0 = the original's width^-1/2; only a randomly initialised tower cares
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"  # layers.ATTENTION_IMPLS: 'xla', 'dot_product_attention', 'splash'

    def __post_init__(self):
        layers.check_attention_impl(self.attention_impl, "ImageBindTowerConfig")

    @property
    def in_channels(self) -> int:
        return 1 if self.modality == "audio" else 3

    @property
    def patch_grid(self) -> tuple[int, int]:
        kh, kw = self.kernel_size[-2:]
        sh, sw = self.stride[-2:]
        return (self.input_size[0] - kh) // sh + 1, (self.input_size[1] - kw) // sw + 1

    @property
    def num_patches(self) -> int:
        rows, cols = self.patch_grid
        return rows * cols

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


AUDIO_HUGE = ImageBindTowerConfig()
VISION_HUGE = ImageBindTowerConfig(
    modality="vision", input_size=(224, 224), kernel_size=(2, 14, 14), stride=(2, 14, 14), width=1280,
    num_layers=32, num_heads=16, mlp_dim=5120, stem_norm_eps=0.0, pre_transformer_norm=True, add_bias_kv=False,
    drop_path=0.0, logit_scale=False,
)
LOGIT_SCALE = 20.0  # the audio postprocessor's fixed exp(log_logit_scale); clipped at 100 in the original
MAX_LOGIT_SCALE = 100.0


def _constant_log_scale(key, shape, dtype=jnp.float32):
    return jnp.full(shape, jnp.log(LOGIT_SCALE), dtype)


# The original's random init (only a randomly initialised tower cares): the trunk's Linear layers are
# Xavier-uniform ("jax" style), torch's packed (3·width, width) in_proj included, so each of our q/k/v thirds
# has that matrix's bound sqrt(6 / (4·width)); bias_k/v are Xavier-normal; the stem convolution and the head keep
# PyTorch's default U(±1/sqrt(fan_in)).
def _xavier(in_axis, out_axis, scale=1.0):
    return jax.nn.initializers.variance_scaling(scale, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis)


PACKED_QKV_INIT = _xavier(0, (1, 2), scale=0.5)
OUT_PROJ_INIT = _xavier((0, 1), 2)
MLP_INIT = _xavier(0, 1)


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention (packed q/k/v with biases, out_proj) with optional add_bias_kv: a learned key
    and value vector appended to the projected keys/values of every sequence (key length + 1)."""

    config: ImageBindTowerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = layers.dtypes(cfg)
        heads = (cfg.num_heads, cfg.head_dim)
        q, k, v = (layers.dense(heads, ("embed", "heads", "kv"), name=name, kernel_init=PACKED_QKV_INIT, **kw)(x)
                   for name in ("query", "key", "value"))
        if cfg.add_bias_kv:
            init = layers.param_init(layers.normal(cfg.width**-0.5), (None, None, None))
            param_dtype = layers.dtype_of(cfg.param_dtype)
            extra = [self.param(name, init, (1, 1, cfg.width), param_dtype) for name in ("bias_k", "bias_v")]
            batch = x.shape[0]
            extra = [jnp.broadcast_to(jnp.asarray(e, q.dtype).reshape(1, 1, *heads), (batch, 1, *heads)) for e in extra]
            k = jnp.concatenate([k, extra[0]], axis=1)
            v = jnp.concatenate([v, extra[1]], axis=1)
        out = layers.attention(q, k, v, impl=cfg.attention_impl)
        return layers.dense(
            cfg.width, ("heads", "kv", "embed"), name="out_proj", num_in=2, kernel_init=OUT_PROJ_INIT, **kw
        )(out)


class ImageBindBlock(nn.Module):
    """Pre-LN block with per-sample drop path on both residual branches (train mode only)."""

    config: ImageBindTowerConfig
    deterministic: bool = True

    def _drop_path(self, branch, rate):
        if self.deterministic or self.config.drop_path == 0.0:
            return branch
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (branch.shape[0],) + (1,) * (branch.ndim - 1))
        return jnp.where(mask, branch / keep, 0).astype(branch.dtype)

    @nn.compact
    def __call__(self, carry):
        x, index = carry
        cfg = self.config
        kw = layers.dtypes(cfg)
        rate = cfg.drop_path * index / max(cfg.num_layers - 1, 1)
        h = layers.layer_norm(cfg.layer_norm_eps, name="norm_1", **kw)(x)
        x = x + self._drop_path(MultiheadAttention(cfg, name="attn")(h), rate)
        h = layers.layer_norm(cfg.layer_norm_eps, name="norm_2", **kw)(x)
        h = layers.dense(cfg.mlp_dim, ("embed", "mlp"), name="fc1", kernel_init=MLP_INIT, **kw)(h)
        h = nn.gelu(h, approximate=False)
        h = layers.dense(cfg.width, ("mlp", "embed"), name="fc2", kernel_init=MLP_INIT, **kw)(h)
        x = x + self._drop_path(h, rate)
        return (nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED), index + 1), None


class ImageBindTower(nn.Module):
    """inputs (N, *input_size) for audio, (N, H, W, 3) for vision -> (feature (N, width), embedding (N, out_dim))."""

    config: ImageBindTowerConfig

    @nn.compact
    def __call__(self, inputs, deterministic: bool = True):
        cfg = self.config
        kw = layers.dtypes(cfg)
        dtype, param_dtype = kw["dtype"], kw["param_dtype"]
        expected = (*cfg.input_size, cfg.in_channels) if cfg.modality == "vision" else tuple(cfg.input_size)
        if tuple(inputs.shape[1:]) != expected:
            raise ValueError(
                f"ImageBind {cfg.modality} tower expects inputs (N, {', '.join(map(str, expected))}), "
                f"got {inputs.shape}"
            )
        x = inputs.astype(dtype)
        if cfg.modality == "audio":
            x = x[..., None]  # (N, mel, time, 1)
        else:  # PadIm2Video: an image becomes a 2-frame clip of itself
            x = jnp.repeat(x[:, None], cfg.kernel_size[0], axis=1)
        patches = nn.Conv(
            cfg.width,
            kernel_size=cfg.kernel_size,
            strides=cfg.stride,
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=layers.param_init(
                layers.torch_linear_uniform(cfg.in_channels * math.prod(cfg.kernel_size)),
                (None,) * (len(cfg.kernel_size) + 1) + ("embed",),
            ),
            name="stem",
        )(x)
        tokens = patches.reshape(patches.shape[0], -1, cfg.width)
        if cfg.stem_norm_eps:
            tokens = layers.layer_norm(cfg.stem_norm_eps, name="stem_norm", **kw)(tokens)
        scale = cfg.width**-0.5  # the original's "openclip" init: N(0, 1) × width^-1/2
        cls_token = self.param(
            "cls_token", layers.param_init(layers.normal(scale), (None, None, "embed")), (1, 1, cfg.width), param_dtype
        )
        pos_std = cfg.pos_embed_init_std or scale
        pos_embed = self.param(
            "pos_embed",
            layers.param_init(layers.normal(pos_std), (None, None, "embed")),
            (1, cfg.num_patches + 1, cfg.width),
            param_dtype,
        )
        batch = tokens.shape[0]
        cls = jnp.broadcast_to(jnp.asarray(cls_token, dtype), (batch, 1, cfg.width))
        x = jnp.concatenate([cls, tokens], axis=1) + jnp.asarray(pos_embed, dtype)
        if cfg.pre_transformer_norm:
            x = layers.layer_norm(cfg.layer_norm_eps, name="pre_norm", **kw)(x)
        x = nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED)
        blocks = layers.stack_layers(
            ImageBindBlock,
            cfg.num_layers,
            scan=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            name="blocks",
            num_broadcast_args=0,
            config=cfg,
            deterministic=deterministic,
        )
        x, _ = blocks((x, jnp.zeros((), jnp.float32)))
        feature = layers.layer_norm(cfg.layer_norm_eps, name="head_norm", **kw)(x)[:, 0]
        embedding = layers.dense(
            cfg.out_dim,
            ("embed", "qformer_embed"),
            name="head",
            use_bias=False,
            kernel_init=layers.torch_linear_uniform(cfg.width),
            **kw,
        )(feature)
        embedding = embedding.astype(jnp.float32)
        # torch.nn.functional.normalize: x / max(||x||, 1e-12)
        embedding = embedding / jnp.maximum(jnp.linalg.norm(embedding, axis=-1, keepdims=True), 1e-12)
        if cfg.logit_scale:
            log_scale = self.param("log_logit_scale", layers.param_init(_constant_log_scale, ()), (), jnp.float32)
            embedding = jnp.minimum(jnp.exp(log_scale), MAX_LOGIT_SCALE) * embedding
        return feature, embedding.astype(dtype)


class ImageBindEncoder(nn.Module):
    """The two ImageBind towers Video-LLaMA uses, under one name (`audio_encoder`)."""

    audio: ImageBindTowerConfig = AUDIO_HUGE
    vision: ImageBindTowerConfig = VISION_HUGE

    def setup(self):
        self.towers = {
            "audio": ImageBindTower(self.audio, name="audio"),
            "vision": ImageBindTower(self.vision, name="vision"),
        }

    def __call__(self, inputs, modality: str, deterministic: bool = True):
        """inputs (B, S, ...) (S clips or frames) -> (feature (B, S, width), embedding (B, S, out_dim))."""
        if modality not in self.towers:
            raise ValueError(f"ImageBind modality {modality!r}: expected 'audio' or 'vision'")
        batch, count = inputs.shape[:2]
        feature, embedding = self.towers[modality](inputs.reshape(batch * count, *inputs.shape[2:]), deterministic)
        return feature.reshape(batch, count, -1), embedding.reshape(batch, count, -1)
