"""Video-LLaMA: a visual and an audio branch around a frozen LLM.

visual: frames (B, T, H, W, 3) → EVA ViT → ln_vision → BLIP-2 Q-Former (32 queries per frame) → + frame position
embedding (row t added to all queries of frame t) → (B, T·32, 768) → video Q-Former (32 queries) → llama_proj
→ (B, 32, LLM hidden) soft tokens, spliced into the LLM input where the prompt holds `<ImageHere>` tokens.
An image is a 1-frame video; batched among videos it is T copies of itself with `frame_mask` [1, 0, …], and the
video (or audio) Q-Former's cross-attention reads frame 0 only, as the original's T = 1.

audio (when `equip_audio_branch`): S clips' fbank (B, S, 128, 204) → ImageBind audio tower → 1024-d embeddings
(B, S, 1024) → + audio position embedding → audio Q-Former (8 queries) → audio_llama_proj → (B, 8, LLM hidden)
soft tokens at the `<AudioHere>` tokens. The audio stages train this branch without audio: frames go through
ImageBind's *vision* tower into the same position embedding and Q-Former (`audio_modality="vision"`).

Submodule names are the original's top-level prefixes (`visual_encoder`, `ln_vision`, `Qformer`, `query_tokens`,
`video_frame_position_embedding`, `video_Qformer`, `video_query_tokens`, `llama_proj`, `llama_model`,
`audio_encoder`, `audio_position_embedding`, `audio_Qformer`, `audio_query_tokens`, `audio_llama_proj`) so a
user finds a checkpoint key's parameter by its first component.
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
from vllama_jax.models.imagebind import AUDIO_HUGE, VISION_HUGE, ImageBindEncoder, ImageBindTowerConfig
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
    # the audio branch (the original's `equip_audio_branch`): ImageBind's audio and vision towers (frozen), then
    # the trainable audio glue. `<AudioHere>` is the token after `<ImageHere>` in Video-LLaMA's tokenizer.
    equip_audio_branch: bool = False
    imagebind_audio: ImageBindTowerConfig = AUDIO_HUGE
    imagebind_vision: ImageBindTowerConfig = VISION_HUGE
    audio_qformer: QFormerConfig = QFormerConfig(num_layers=2, encoder_width=1024, cross_attention_freq=1)
    num_audio_query_tokens: int = 8
    max_audio_pos: int = 8
    audio_token_id: int = 32001
    # dtype of the trainable glue (position embeddings, query tokens, projections).
    dtype: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def from_dict(cls, d: dict) -> VideoLlamaConfig:
        """Nested dicts override the field's default (so `imagebind_vision=dict(width=32)` keeps the vision layout)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown Video-LLaMA model config keys {sorted(unknown)}; known: {sorted(fields)}")
        kwargs = {}
        for key, value in d.items():
            default = fields[key].default
            if dataclasses.is_dataclass(default):
                known = {f.name for f in dataclasses.fields(default)}
                bad = set(value) - known
                if bad:
                    raise ValueError(f"unknown keys {sorted(bad)} in model.{key}; known: {sorted(known)}")
                value = dataclasses.replace(
                    default, **{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                )
            kwargs[key] = value
        return cls(**kwargs)


# Top-level parameters trained in the vision stages (SPEC §3) and in the audio stages (§4); the rest is frozen.
VISUAL_TRAINABLE = ("video_Qformer", "video_query_tokens", "video_frame_position_embedding", "llama_proj")
AUDIO_TRAINABLE = ("audio_Qformer", "audio_query_tokens", "audio_position_embedding", "audio_llama_proj")
# The frozen encoders whose outputs (`frame_features`, `audio_features`) the frozen-feature cache holds: a step
# that reads cached features needs none of their weights.
FROZEN_TOWERS = ("visual_encoder", "ln_vision", "Qformer", "audio_encoder")

BRANCHES = ("visual", "audio", "audio_visual")
AUDIO_SOURCES = ("frames", "fbank")


@dataclasses.dataclass(frozen=True)
class Branch:
    """What a training stage trains and what its step reads (SPEC §3, §4): one record for the whole code base.

    name: "visual" (the vision stages: frames to the visual branch), "audio" (the audio stages: the audio glue) or
    "audio_visual" (the tiny demo's variant with sound: both, frames to the visual branch and fbank to the audio
    one). audio_source: what the audio branch reads, "frames" (ImageBind's vision tower on the video frames, the
    paper's way of training it without audio) or "fbank" (the clips' audio track, as at inference).
    """

    name: str = "visual"
    audio_source: str = "frames"

    def __post_init__(self):
        if self.name not in BRANCHES or self.audio_source not in AUDIO_SOURCES:
            raise ValueError(
                f"branch {self.name!r} / audio_source {self.audio_source!r}: expected one of {BRANCHES} / "
                f"{AUDIO_SOURCES}"
            )
        if self.name == "audio_visual" and self.audio_source != "fbank":
            raise ValueError(
                "branch 'audio_visual' reads the frames and the audio track: set data.audio_source='fbank'"
            )

    @property
    def trainable(self) -> tuple[str, ...]:
        """The top-level parameter subtrees the stage trains."""
        return {
            "visual": VISUAL_TRAINABLE,
            "audio": AUDIO_TRAINABLE,
            "audio_visual": VISUAL_TRAINABLE + AUDIO_TRAINABLE,
        }[self.name]

    @property
    def audio_modality(self) -> str:
        """How the audio branch reads its input: "vision" (frames through ImageBind's vision tower) or "audio"."""
        return "vision" if self.name == "audio" and self.audio_source == "frames" else "audio"

    @property
    def reads_audio_track(self) -> bool:
        return "audio" in self.media_keys()

    def media_keys(self, cached: bool = False) -> tuple[str, ...]:
        """The batch's media arrays (or, when `cached`, the frozen towers' outputs, named as `VideoLlama`'s
        arguments) the step reads, with `frame_mask` wherever frames feed a branch (an image's copies masked)."""
        frames_to_audio = self.audio_modality == "vision"
        if cached:
            return {
                "visual": ("video_features", "frame_mask"),
                "audio": ("audio_features", "frame_mask") if frames_to_audio else ("audio_features",),
                "audio_visual": ("video_features", "frame_mask", "audio_features"),
            }[self.name]
        return {
            "visual": ("frames", "frame_mask"),
            "audio": ("frames", "frame_mask") if frames_to_audio else ("audio",),
            "audio_visual": ("frames", "frame_mask", "audio"),
        }[self.name]

    def batch_keys(self, cached: bool = False) -> tuple[str, ...]:
        """Every batch array the train step reads: the media (or cached features) and the text."""
        return (*self.media_keys(cached), "input_ids", "padding_mask", "labels")

    def model_inputs(self, batch: dict, cached: bool = False) -> dict:
        """Keyword arguments of `VideoLlama.encode` / `__call__` taken from a batch (of media, or of the frozen
        towers' cached outputs when `cached`). A batch without `frame_mask` has every frame real."""
        keys = self.media_keys(cached)
        inputs = {
            "frames": None,
            "audio_modality": self.audio_modality,
            "frame_mask": batch.get("frame_mask") if "frame_mask" in keys else None,
        }
        if cached:
            return {**inputs, **{k: batch[k] for k in keys if k != "frame_mask"}}
        if self.name in ("visual", "audio_visual"):
            inputs["frames"] = batch["frames"]
        if self.name in ("audio", "audio_visual"):
            inputs["audio"] = batch["frames"] if self.audio_modality == "vision" else batch["audio"]
        return inputs


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
        self.query_tokens = self._query_tokens("query_tokens", cfg.num_query_tokens, qformer_width)
        self.video_frame_position_embedding = _position_embedding(cfg.max_frame_pos, qformer_width, dtype, param_dtype)
        self.video_Qformer = QFormer(cfg.video_qformer)
        self.video_query_tokens = self._query_tokens(
            "video_query_tokens", cfg.num_video_query_tokens, cfg.video_qformer.hidden_size
        )
        self.llama_proj = _projection(cfg.video_qformer.hidden_size, cfg.llm.hidden_size, dtype, param_dtype)
        self.llama_model = LlamaForCausalLM(cfg.llm)
        if cfg.equip_audio_branch:
            self._setup_audio_branch(dtype, param_dtype)

    def _setup_audio_branch(self, dtype, param_dtype):
        cfg = self.config
        embed_dim = cfg.imagebind_audio.out_dim
        if cfg.imagebind_vision.out_dim != embed_dim or cfg.audio_qformer.encoder_width != embed_dim:
            raise ValueError(
                f"the audio Q-Former reads ImageBind's joint embedding: imagebind_audio.out_dim "
                f"({embed_dim}), imagebind_vision.out_dim ({cfg.imagebind_vision.out_dim}) and "
                f"audio_qformer.encoder_width ({cfg.audio_qformer.encoder_width}) must agree"
            )
        self.audio_encoder = ImageBindEncoder(cfg.imagebind_audio, cfg.imagebind_vision)
        self.audio_position_embedding = _position_embedding(cfg.max_audio_pos, embed_dim, dtype, param_dtype)
        self.audio_Qformer = QFormer(cfg.audio_qformer)
        self.audio_query_tokens = self._query_tokens(
            "audio_query_tokens", cfg.num_audio_query_tokens, cfg.audio_qformer.hidden_size
        )
        self.audio_llama_proj = _projection(cfg.audio_qformer.hidden_size, cfg.llm.hidden_size, dtype, param_dtype)

    def _query_tokens(self, name: str, count: int, width: int):
        """Learned Q-Former queries (1, count, width), N(0, 0.02) as BERT's initializer_range."""
        init = layers.param_init(layers.normal(), (None, None, "embed"))
        return self.param(name, init, (1, count, width), layers.dtype_of(self.config.param_dtype))

    def frame_features(self, frames):
        """The frozen half of the visual branch: frames (B, T, H, W, 3), CLIP-normalised -> the image Q-Former's
        query outputs per frame (B, T, num_query_tokens, Q-Former width). What the frozen-feature cache stores."""
        cfg = self.config
        batch, num_frames = frames.shape[:2]
        image_embeds = self.ln_vision(self.visual_encoder(frames.reshape(batch * num_frames, *frames.shape[2:])))
        # The frozen image Q-Former always runs deterministically (PyTorch keeps it in eval mode).
        query = jnp.broadcast_to(self.query_tokens, (batch * num_frames, *self.query_tokens.shape[1:]))
        frame_queries = self.Qformer(query, image_embeds, deterministic=True)
        return frame_queries.reshape(batch, num_frames, cfg.num_query_tokens, -1)

    def encode_video(self, frames=None, deterministic: bool = True, *, features=None, frame_mask=None):
        """frames (B, T, H, W, 3), CLIP-normalised, or their `frame_features` -> soft tokens
        (B, num_video_query_tokens, LLM hidden).

        frame_mask (B, T) bool, None = every frame: the video Q-Former cross-attends only to the queries of the
        frames it marks. An image given as T frames with mask [1, 0, …] gives the soft tokens of the same image
        as one frame (the original's T = 1: frame position 0, num_query_tokens encoder tokens).
        """
        cfg = self.config
        frame_queries = self.frame_features(frames) if features is None else features
        batch, num_frames = frame_queries.shape[:2]
        if num_frames > cfg.max_frame_pos:
            raise ValueError(f"{num_frames} frames exceed max_frame_pos={cfg.max_frame_pos}")
        frame_queries = frame_queries + self.video_frame_position_embedding(jnp.arange(num_frames))[None, :, None, :]
        frame_queries = frame_queries.reshape(batch, num_frames * cfg.num_query_tokens, -1)
        video_query = jnp.broadcast_to(self.video_query_tokens, (batch, *self.video_query_tokens.shape[1:]))
        encoder_mask = _encoder_mask(frame_mask, batch, num_frames, cfg.num_query_tokens)
        video_hidden = self.video_Qformer(video_query, frame_queries, encoder_mask, deterministic=deterministic)
        return self.llama_proj(video_hidden)

    def audio_features(self, inputs, modality: str = "audio", deterministic: bool = True):
        """The frozen half of the audio branch: ImageBind's normalised joint embeddings (B, S, out_dim).

        inputs: fbank clips (B, S, 128, 204) or, as the data pipeline and the original give them, (B, S, 1, 128, 204)
        for modality "audio"; CLIP-normalised frames (B, S, H, W, 3) for "vision" (the audio stages' way of
        training without audio). ImageBind is frozen but, as in the original (whose train() reaches it), its
        audio tower's drop path is active when not deterministic.
        """
        if not self.config.equip_audio_branch:
            raise ValueError("this model has no audio branch: set model.equip_audio_branch=True")
        if modality == "audio" and inputs.ndim == 5:
            inputs = inputs[:, :, 0]  # the single fbank channel
        _, embeddings = self.audio_encoder(inputs, modality, deterministic=deterministic)
        return embeddings

    def encode_audio(
        self, inputs=None, modality: str = "audio", deterministic: bool = True, *, features=None, frame_mask=None
    ):
        """fbank clips or frames (see `audio_features`), or their `audio_features` -> audio soft tokens
        (B, num_audio_query_tokens, LLM hidden). frame_mask (B, S) bool, None = all: the clips or frames the audio
        Q-Former reads (the audio stages' image: frame 0 of its copies, as `encode_video`)."""
        cfg = self.config
        if not cfg.equip_audio_branch:
            raise ValueError("this model has no audio branch: set model.equip_audio_branch=True")
        embeddings = self.audio_features(inputs, modality, deterministic) if features is None else features
        batch, count = embeddings.shape[:2]
        if count > cfg.max_audio_pos:
            raise ValueError(f"{count} audio clips/frames exceed max_audio_pos={cfg.max_audio_pos}")
        embeddings = embeddings + self.audio_position_embedding(jnp.arange(count))[None]
        query = jnp.broadcast_to(self.audio_query_tokens, (batch, *self.audio_query_tokens.shape[1:]))
        encoder_mask = _encoder_mask(frame_mask, batch, count, 1)
        audio_hidden = self.audio_Qformer(query, embeddings, encoder_mask, deterministic=deterministic)
        return self.audio_llama_proj(audio_hidden)

    def encode(
        self,
        frames=None,
        audio=None,
        audio_modality: str = "audio",
        deterministic: bool = True,
        *,
        video_features=None,
        audio_features=None,
        frame_mask=None,
    ) -> dict:
        """{"video": soft tokens, "audio": soft tokens} for whichever inputs are given (media, or the frozen
        towers' outputs from the feature cache). `frame_mask` (B, T) marks the real frames wherever frames go:
        to the visual branch, and to the audio branch when it reads them (`audio_modality="vision"`)."""
        soft = {}
        if frames is not None or video_features is not None:
            soft["video"] = self.encode_video(
                frames, deterministic=deterministic, features=video_features, frame_mask=frame_mask
            )
        if audio is not None or audio_features is not None:
            soft["audio"] = self.encode_audio(
                audio,
                audio_modality,
                deterministic=deterministic,
                features=audio_features,
                frame_mask=frame_mask if audio_modality == "vision" else None,
            )
        return soft

    def splice(self, input_ids, soft_tokens=None, audio_soft_tokens=None):
        """LLM input embeddings with the k-th `<ImageHere>` of each row replaced by soft token k of that row
        (and the k-th `<AudioHere>` by audio soft token k)."""
        cfg = self.config
        is_image = input_ids == cfg.image_token_id
        is_audio = input_ids == cfg.audio_token_id
        # in the activations' layout (rows over the batch axes) before the gathers, which would otherwise start
        # from the weights' layout and make XLA replicate the tensor to re-partition it
        text_embeds = nn.with_logical_constraint(
            self.llama_model.embed(jnp.where(is_image | is_audio, 0, input_ids)), layers.BATCH_LENGTH_EMBED
        )
        soft_tokens, audio_soft_tokens = (
            None if x is None else nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED)
            for x in (soft_tokens, audio_soft_tokens)
        )
        if soft_tokens is not None:
            text_embeds = splice_soft_tokens(text_embeds, is_image, soft_tokens.astype(text_embeds.dtype))
        if audio_soft_tokens is not None:
            text_embeds = splice_soft_tokens(text_embeds, is_audio, audio_soft_tokens.astype(text_embeds.dtype))
        return text_embeds

    def __call__(
        self,
        frames,
        input_ids,
        padding_mask=None,
        deterministic: bool = True,
        *,
        audio=None,
        audio_modality: str = "audio",
        video_features=None,
        audio_features=None,
        frame_mask=None,
    ):
        """-> (logits (B, S, vocab) float32, {"video": soft tokens, "audio": soft tokens} for the branches run).

        frames (or None) feed the visual branch; audio (or None) the audio branch, read as `audio_modality`;
        video_features / audio_features replace them with the frozen towers' cached outputs; frame_mask (B, T)
        marks the real frames (`encode`; None = all).
        """
        soft = self.encode(
            frames,
            audio,
            audio_modality,
            deterministic=deterministic,
            video_features=video_features,
            audio_features=audio_features,
            frame_mask=frame_mask,
        )
        inputs_embeds = self.splice(input_ids, soft.get("video"), soft.get("audio"))
        logits = self.llama_model(inputs_embeds=inputs_embeds, padding_mask=padding_mask)
        return logits, soft

    def initialize(self, frames, input_ids, audio=None, audio_frames=None):
        """Touch every submodule once (for `init`): the forward pass, plus ImageBind's vision tower, which only
        the audio stages' frame input reaches."""
        out = self(frames, input_ids, audio=audio)
        if audio_frames is not None:
            self.audio_encoder(audio_frames, "vision")
        return out


def _encoder_mask(frame_mask, batch: int, num_frames: int, tokens_per_frame: int):
    """A Q-Former encoder mask (B, T · tokens_per_frame) from a per-frame mask (B, T); None stays None (all)."""
    if frame_mask is None:
        return None
    if tuple(frame_mask.shape) != (batch, num_frames):
        raise ValueError(
            f"frame_mask has shape {tuple(frame_mask.shape)}, expected (batch, frames) = {(batch, num_frames)}"
        )
    return jnp.repeat(jnp.asarray(frame_mask, bool), tokens_per_frame, axis=1)


def _position_embedding(count: int, width: int, dtype, param_dtype) -> nn.Embed:
    """nn.Embedding in the original, so PyTorch's default N(0, 1) init (BERT's init does not reach it)."""
    init = layers.param_init(jax.nn.initializers.normal(1.0), (None, "embed"))
    return nn.Embed(count, width, dtype=dtype, param_dtype=param_dtype, embedding_init=init)


def _projection(in_width: int, out_width: int, dtype, param_dtype):
    """A Q-Former → LLM projection (nn.Linear in the original, with its default uniform init)."""
    init = layers.torch_linear_uniform(in_width)
    return layers.dense(
        out_width,
        ("qformer_embed", "embed"),
        name=None,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=init,
        bias_init=init,
    )


def init_inputs(config: VideoLlamaConfig, frame_size: int | None = None) -> dict:
    """Smallest inputs for `VideoLlama.init(..., method=VideoLlama.initialize)` that reach every parameter the
    config builds: one clip of one frame, and for the audio branch one fbank clip and one ImageBind-sized frame."""
    size = frame_size or config.vision.image_size
    out = {
        "frames": jnp.zeros((1, 1, size, size, 3), jnp.float32),
        "input_ids": jnp.zeros((1, 1 + config.num_video_query_tokens), jnp.int32),
    }
    if config.equip_audio_branch:
        out["audio"] = jnp.zeros((1, 1, *config.imagebind_audio.input_size), jnp.float32)
        out["audio_frames"] = jnp.zeros((1, 1, *config.imagebind_vision.input_size, 3), jnp.float32)
    return out


def init_params(model: VideoLlama, rng, frame_size: int | None = None) -> dict:
    """Boxed parameters of every branch the config builds (under jax.eval_shape: shapes only, nothing allocated)."""
    return model.init(rng, **init_inputs(model.config, frame_size), method=VideoLlama.initialize)["params"]


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
