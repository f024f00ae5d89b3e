"""Video-LLaMA's visual branch around a frozen LLM.

frames (B, T, H, W, 3) → EVA ViT → ln_vision → BLIP-2 Q-Former (32 queries per frame) → + frame position
embedding (row t added to all queries of frame t) → (B, T·32, 768) → video Q-Former (32 queries) → llama_proj
→ (B, 32, LLM hidden) soft tokens, spliced into the LLM input where the prompt holds `<ImageHere>` tokens.

Submodule names are the original's top-level prefixes (`visual_encoder`, `ln_vision`, `Qformer`, `query_tokens`,
`video_frame_position_embedding`, `video_Qformer`, `video_query_tokens`, `llama_proj`, `llama_model`) so a user
finds a checkpoint key's parameter by its first component.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.models import layers
from vllama_jax.models.eva_vit import EvaVisionTransformer, EvaVitConfig, ln_vision
from vllama_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vllama_jax.models.qformer import QFormer, QFormerConfig



@dataclasses.dataclass(frozen=True)
class VideoLlamaConfig:
    vision: EvaVitConfig = EvaVitConfig()
    qformer: QFormerConfig = QFormerConfig()
    num_query_tokens: int = 32
    video_qformer: QFormerConfig = QFormerConfig(num_layers=2, encoder_width=768, cross_attention_freq=1)
    num_video_query_tokens: int = 32
    max_frame_pos: int = 32
    llm: LlamaConfig = LlamaConfig()
    # Id of `<ImageHere>` in the tokenizer. It lies past the LLM vocabulary (32000 for LLaMA), so it is never
    # looked up in the embedding table: its positions receive soft tokens instead.
    image_token_id: int = 32000
    # dtype of the trainable glue (position embedding, query tokens, llama_proj).
    dtype: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def from_dict(cls, d: dict) -> "VideoLlamaConfig":
        nested = {"vision": EvaVitConfig, "qformer": QFormerConfig, "video_qformer": QFormerConfig, "llm": LlamaConfig}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Video-LLaMA model config keys {sorted(unknown)}; known: {sorted(known)}")
        kwargs = {}
        for key, value in d.items():
            if key in nested:
                fields = {f.name for f in dataclasses.fields(nested[key])}
                bad = set(value) - fields
                if bad:
                    raise ValueError(f"unknown keys {sorted(bad)} in model.{key}; known: {sorted(fields)}")
                value = nested[key](**value)
            kwargs[key] = value
        return cls(**kwargs)


# Top-level parameters trained in the vision stages (SPEC §3); everything else is frozen.
VISUAL_TRAINABLE = ("video_Qformer", "video_query_tokens", "video_frame_position_embedding", "llama_proj")


def count_params(params: Any, subtrees: tuple[str, ...] | None = None) -> int:
    """Number of parameters, in all of `params` or in the named top-level subtrees (works on abstract trees)."""
    params = nn.unbox(params)
    chosen = params if subtrees is None else {k: v for k, v in params.items() if k in subtrees}
    return sum(int(math.prod(x.shape)) for x in jax.tree_util.tree_leaves(chosen))


class VideoLlama(nn.Module):
    config: VideoLlamaConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        qformer_width = cfg.qformer.hidden_size
        if cfg.video_qformer.encoder_width != qformer_width:
            raise ValueError(
                f"video Q-Former reads the image Q-Former's output: encoder_width must be {qformer_width}, "
                f"got {cfg.video_qformer.encoder_width}"
            )
        if cfg.qformer.encoder_width != cfg.vision.width:
            raise ValueError(f"Q-Former encoder_width {cfg.qformer.encoder_width} != ViT width {cfg.vision.width}")
        self.visual_encoder = EvaVisionTransformer(cfg.vision)
        self.ln_vision = ln_vision(cfg.vision, name=None)
        self.Qformer = QFormer(cfg.qformer)
        self.query_tokens = self.param(
            "query_tokens",
            layers.param_init(layers.normal(), (None, None, "embed")),
            (1, cfg.num_query_tokens, qformer_width),
            param_dtype,
        )
        # nn.Embedding in the original, so PyTorch's default N(0, 1) init (BERT's init does not reach it).
        self.video_frame_position_embedding = nn.Embed(
            cfg.max_frame_pos,
            qformer_width,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=layers.param_init(jax.nn.initializers.normal(1.0), (None, "embed")),
        )
        self.video_Qformer = QFormer(cfg.video_qformer)
        self.video_query_tokens = self.param(
            "video_query_tokens",
            layers.param_init(layers.normal(), (None, None, "embed")),
            (1, cfg.num_video_query_tokens, cfg.video_qformer.hidden_size),
            param_dtype,
        )
        fan_in = cfg.video_qformer.hidden_size
        self.llama_proj = layers.dense(
            cfg.llm.hidden_size,
            ("qformer_embed", "embed"),
            name=None,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=layers.torch_linear_uniform(fan_in),
            bias_init=layers.torch_linear_uniform(fan_in),
        )
        self.llama_model = LlamaForCausalLM(cfg.llm)

    def encode_video(self, frames, deterministic: bool = True):
        """frames (B, T, H, W, 3), CLIP-normalised -> soft tokens (B, num_video_query_tokens, LLM hidden)."""
        cfg = self.config
        batch, num_frames = frames.shape[:2]
        if num_frames > cfg.max_frame_pos:
            raise ValueError(f"{num_frames} frames exceed max_frame_pos={cfg.max_frame_pos}")
        image_embeds = self.ln_vision(self.visual_encoder(frames.reshape(batch * num_frames, *frames.shape[2:])))
        # The frozen image Q-Former always runs deterministically (PyTorch keeps it in eval mode).
        query = jnp.broadcast_to(self.query_tokens, (batch * num_frames, *self.query_tokens.shape[1:]))
        frame_queries = self.Qformer(query, image_embeds, deterministic=True)
        frame_queries = frame_queries.reshape(batch, num_frames, cfg.num_query_tokens, -1)
        frame_queries = frame_queries + self.video_frame_position_embedding(jnp.arange(num_frames))[None, :, None, :]
        frame_queries = frame_queries.reshape(batch, num_frames * cfg.num_query_tokens, -1)
        video_query = jnp.broadcast_to(self.video_query_tokens, (batch, *self.video_query_tokens.shape[1:]))
        video_hidden = self.video_Qformer(video_query, frame_queries, deterministic=deterministic)
        return self.llama_proj(video_hidden)

    def splice(self, input_ids, soft_tokens):
        """LLM input embeddings with the k-th `<ImageHere>` of each row replaced by soft token k of that row."""
        is_placeholder = input_ids == self.config.image_token_id
        text_embeds = self.llama_model.embed(jnp.where(is_placeholder, 0, input_ids))
        return splice_soft_tokens(text_embeds, is_placeholder, soft_tokens.astype(text_embeds.dtype))

    def __call__(self, frames, input_ids, padding_mask=None, deterministic: bool = True):
        """-> (logits (B, S, vocab) float32, soft tokens (B, num_video_query_tokens, LLM hidden))."""
        soft_tokens = self.encode_video(frames, deterministic=deterministic)
        inputs_embeds = self.splice(input_ids, soft_tokens)
        logits = self.llama_model(inputs_embeds=inputs_embeds, padding_mask=padding_mask)
        return logits, soft_tokens


def splice_soft_tokens(text_embeds, is_placeholder, soft_tokens):
    """Static-shape splice: the k-th True of `is_placeholder` in row b takes soft_tokens[b, k].

    The data pipeline guarantees each row holds exactly soft_tokens.shape[1] placeholders (see
    `vllama_jax.data.text.check_placeholders`); extra ones would repeat the last soft token.
    """
    order = jnp.clip(jnp.cumsum(is_placeholder, axis=1) - 1, 0, soft_tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(soft_tokens, order[..., None], axis=1)
    return jnp.where(is_placeholder[..., None], gathered, text_embeds)


def causal_lm_loss(logits, labels) -> tuple[Any, Any]:
    """Mean next-token cross-entropy over labels != IGNORE_INDEX (HF's LlamaForCausalLM loss).

    Returns (loss, number of counted tokens). Position t's logits predict labels[t + 1].
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    count = valid.sum()
    loss = -(picked * valid).sum() / jnp.maximum(count, 1)
    return loss, count
