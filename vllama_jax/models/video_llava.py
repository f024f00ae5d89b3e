"""Video-LLaVA (PKU-YuanGroup, arXiv 2311.10122): two frozen CLIP ViT-L/14 towers, one MLP projector, a LLaMA.

images (N, H, W, 3) → `image_tower` (LanguageBind_Image) → hidden state -2 without CLS → (N, 256, 1024)
videos (N, 8, H, W, 3) → `video_tower` (LanguageBind_Video_merge, temporal attention) → hidden state -2, every
token of every frame kept → (N, 8·257, 1024)
both → `mm_projector` (mlp2x_gelu: Linear 1024→4096, exact GELU, Linear 4096→4096, shared) → soft tokens.

Splicing at static shapes: the text already holds one placeholder token per soft token (`<image>` as 256
`image_token_id`s, `<video>` as 8·257 `video_token_id`s, as transformers' processor expands them). The k-th
image placeholder *of the batch* (rows in order, then positions) takes soft token k of the flattened image soft
tokens, and likewise for videos: the order in which the original's `prepare_inputs_labels_for_multimodal`
consumes its list of features (and transformers' `masked_scatter`). So a batch holds a fixed number of images and
of videos (one compile per shape bucket), and rows without a placeholder (text-only) read neither. Labels are
IGNORE_INDEX on every soft token (the data side writes them; `causal_lm_loss` skips them).

Submodule names are the transformers port's (`image_tower`, `video_tower`, `mm_projector`, `language_model`);
the original's keys map to them in `vllama_jax.convert.video_llava`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.models import layers
from vllama_jax.models.clip_vit import ClipVisionTower, ClipVitConfig
from vllama_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vllama_jax.models.video_llama import causal_lm_loss

# Vicuna-7B v1.5 (LLaMA-2-7B based: RMSNorm eps 1e-5), the LLM Video-LLaVA-7B fine-tunes.
VICUNA_7B_V1_5 = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5
)

# Stage 1 trains the projector only; stage 2 the projector and the whole LLM (the towers stay frozen).
TRAINABLE = {"stage1": ("mm_projector",), "stage2": ("mm_projector", "language_model")}
FROZEN_TOWERS = ("image_tower", "video_tower")


@dataclasses.dataclass(frozen=True)
class VideoLlavaConfig:
    image_tower: ClipVitConfig = ClipVitConfig()
    video_tower: ClipVitConfig = ClipVitConfig(temporal_attention=True)
    llm: LlamaConfig = VICUNA_7B_V1_5
    # Placeholder ids in the text (transformers' `<image>` / `<video>`: 32000 / 32001; the original splices at a
    # -200 sentinel instead). Ids at or past the LLM vocabulary are never looked up: their rows take soft tokens.
    image_token_id: int = 32000
    video_token_id: int = 32001
    # the projector's dtype (trainable in both stages)
    dtype: str = "float32"
    param_dtype: str = "float32"

    @property
    def image_tokens(self) -> int:
        """Soft tokens per image: the patches (CLS dropped)."""
        return self.image_tower.num_patches

    @property
    def video_tokens(self) -> int:
        """Soft tokens per video: every token (CLS and patches) of every frame."""
        return self.video_tower.num_frames * (self.video_tower.num_patches + 1)

    @classmethod
    def from_dict(cls, d: dict) -> VideoLlavaConfig:
        """Nested dicts override the field's default (so `video_tower=dict(width=32)` keeps temporal attention)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown Video-LLaVA model config keys {sorted(unknown)}; known: {sorted(fields)}")
        kwargs = {}
        for key, value in d.items():
            default = fields[key].default
            if dataclasses.is_dataclass(default):
                known = {f.name for f in dataclasses.fields(default)}
                bad = set(value) - known
                if bad:
                    raise ValueError(f"unknown keys {sorted(bad)} in model.{key}; known: {sorted(known)}")
                value = dataclasses.replace(default, **value)
            kwargs[key] = value
        return cls(**kwargs)


class Projector(nn.Module):
    """mlp2x_gelu: Linear(tower width → LLM width), exact GELU, Linear(LLM width → LLM width)."""

    out_width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        first, second = layers.torch_linear_uniform(x.shape[-1]), layers.torch_linear_uniform(self.out_width)
        x = layers.dense(self.out_width, ("encoder_embed", "mlp"), name="linear_1", kernel_init=first,
                         bias_init=first, **kw)(x)
        x = nn.gelu(x, approximate=False)
        return layers.dense(self.out_width, ("mlp", "embed"), name="linear_2", kernel_init=second,
                            bias_init=second, **kw)(x)


class VideoLlava(nn.Module):
    config: VideoLlavaConfig

    def setup(self):
        cfg = self.config
        if cfg.image_tower.width != cfg.video_tower.width:
            raise ValueError(
                f"one projector reads both towers: image_tower.width {cfg.image_tower.width} != "
                f"video_tower.width {cfg.video_tower.width}"
            )
        self.image_tower = ClipVisionTower(cfg.image_tower)
        self.video_tower = ClipVisionTower(cfg.video_tower)
        self.mm_projector = Projector(cfg.llm.hidden_size, **layers.dtypes(cfg))
        self.language_model = LlamaForCausalLM(cfg.llm)

    def encode_images(self, images):
        """images (N, H, W, 3), CLIP-normalised -> soft tokens (N, 256, LLM width)."""
        return self.mm_projector(self.image_tower(images)[:, 1:])

    def encode_videos(self, videos):
        """videos (N, T, H, W, 3), CLIP-normalised -> soft tokens (N, T·257, LLM width), frame by frame."""
        features = self.video_tower(videos)
        return self.mm_projector(features.reshape(features.shape[0], -1, features.shape[-1]))

    def splice(self, input_ids, image_soft=None, video_soft=None):
        """LLM input embeddings: text embeddings with the batch's image (video) placeholders, in row order, taking
        the flattened image (video) soft tokens in order."""
        cfg = self.config
        is_image, is_video = input_ids == cfg.image_token_id, input_ids == cfg.video_token_id
        embeds = self.language_model.embed(jnp.where(is_image | is_video, 0, input_ids))
        embeds = nn.with_logical_constraint(embeds, layers.BATCH_LENGTH_EMBED)
        for soft, is_placeholder in ((image_soft, is_image), (video_soft, is_video)):
            if soft is not None:
                embeds = splice_in_batch_order(embeds, is_placeholder, soft.astype(embeds.dtype))
        return embeds

    def prompt_embeds(self, input_ids, images=None, videos=None):
        """The LLM's input embeddings: the text's, with the images' and videos' soft tokens at their placeholders
        (what cached generation starts from, `infer.generate`)."""
        image_soft = None if images is None else self.encode_images(images)
        video_soft = None if videos is None else self.encode_videos(videos)
        return self.splice(input_ids, image_soft, video_soft)

    def __call__(self, input_ids, padding_mask=None, *, images=None, videos=None):
        """-> float32 logits (B, S, vocab). images (N_images, H, W, 3) and videos (N_videos, T, H, W, 3), either
        may be None (then nothing of that kind is spliced)."""
        inputs_embeds = self.prompt_embeds(input_ids, images, videos)
        return self.language_model(inputs_embeds=inputs_embeds, padding_mask=padding_mask)

    def initialize(self, input_ids, images, videos):
        """Touch every parameter once (for `init`)."""
        return self(input_ids, images=images, videos=videos)


def init_inputs(config: VideoLlavaConfig) -> dict:
    """Smallest inputs for `VideoLlava.init(..., method=VideoLlava.initialize)`: one image, one video, one token."""
    def frames(tower: ClipVitConfig, *lead):
        return jnp.zeros((*lead, tower.image_size, tower.image_size, 3), jnp.float32)

    video_lead = (1, config.video_tower.num_frames) if config.video_tower.temporal_attention else (1, 1)
    return {
        "input_ids": jnp.zeros((1, 1), jnp.int32),
        "images": frames(config.image_tower, 1),
        "videos": frames(config.video_tower, *video_lead),
    }


def init_params(model: VideoLlava, rng) -> dict:
    """Boxed parameters (under jax.eval_shape: shapes only, nothing allocated)."""
    return model.init(rng, **init_inputs(model.config), method=VideoLlava.initialize)["params"]


def splice_in_batch_order(embeds, is_placeholder, soft_tokens):
    """embeds (B, S, D); is_placeholder (B, S); soft_tokens (N, K, D): the k-th placeholder of the flattened batch
    takes the k-th of the N·K soft tokens (extra placeholders repeat the last; the data side counts them)."""
    batch, length, width = embeds.shape
    flat_soft = soft_tokens.reshape(-1, width)
    flat_mask = is_placeholder.reshape(-1)
    order = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, flat_soft.shape[0] - 1)
    gathered = jnp.take(flat_soft, order, axis=0).reshape(batch, length, width)
    return jnp.where(is_placeholder[..., None], gathered, embeds)


def video_llava_loss(model: VideoLlava) -> Any:
    """The caption / conversation loss as a train step's `loss_fn(params, batch, rng) -> (loss, label tokens)`:
    the batch's `images` / `videos` (either may be absent), `input_ids`, `padding_mask`, `labels`. A soft token
    is never a target, whatever the labels say (the original labels each one IGNORE_INDEX)."""
    cfg = model.config

    def loss_fn(params, batch, rng):
        del rng  # no dropout anywhere in Video-LLaVA's trained parts
        input_ids = batch["input_ids"]
        logits = model.apply(
            {"params": params}, input_ids, batch["padding_mask"], images=batch.get("images"), videos=batch.get("videos")
        )
        soft = (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)
        return causal_lm_loss(logits, jnp.where(soft, IGNORE_INDEX, batch["labels"]))

    return loss_fn
