"""A config's inputs: the model config with the tokenizer's placeholder ids, the data pipeline's config (text
layout, frames, audio), and the batches a run trains on (media shards through the decoding pipeline, or the
frozen towers' outputs from a feature cache). Shared by the trainer and the frozen-feature cache, so that a cached
example is token for token the example training would have made."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp

from vllama_jax.config import branch as config_branch
from vllama_jax.config import model_config
from vllama_jax.constants import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER
from vllama_jax.data.features import make_feature_dataset, read_manifest
from vllama_jax.data.pipeline import PipelineConfig, make_dataset
from vllama_jax.data.prepare import shard_paths
from vllama_jax.models.video_llama import Branch, VideoLlamaConfig


def text_length(branch: Branch, model_cfg: VideoLlamaConfig, max_txt_len: int, prompt_tokens: int = 0) -> int:
    """Tokens per example: [BOS] + the soft-token placeholders (the audio block and the video block for
    "audio_visual") + a caption prompt's own tokens + max_txt_len caption tokens."""
    soft = model_cfg.num_audio_query_tokens if branch.name == "audio" else model_cfg.num_video_query_tokens
    if branch.name == "audio_visual":
        soft += model_cfg.num_audio_query_tokens
    return 1 + soft + prompt_tokens + max_txt_len


def model_and_pipeline(config, tokenizer) -> tuple[VideoLlamaConfig, PipelineConfig]:
    """(model config, this process's pipeline config) for a training config and its tokenizer."""
    branch = config_branch(config)
    model_cfg = dataclasses.replace(
        model_config(config), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    )
    num_soft_tokens, prompts = model_cfg.num_video_query_tokens, tuple(config.data.get("caption_prompts", ()))
    if branch.name == "audio":  # the original's audio stages put their 8 soft tokens at <ImageHere> placeholders too
        model_cfg = dataclasses.replace(model_cfg, audio_token_id=model_cfg.image_token_id)
        num_soft_tokens = model_cfg.num_audio_query_tokens
    elif branch.name == "audio_visual":  # [BOS] + audio block + video block + caption (the demo's order)
        model_cfg = dataclasses.replace(model_cfg, audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER))
        prompts = (AUDIO_PLACEHOLDER * model_cfg.num_audio_query_tokens + IMAGE_PLACEHOLDER,)
    # room for the longest caption prompt's text (its placeholders are counted by text_length)
    prompt_text = max(
        (
            len(
                tokenizer(p.replace(IMAGE_PLACEHOLDER, "").replace(AUDIO_PLACEHOLDER, ""), add_special_tokens=False)[
                    "input_ids"
                ]
            )
            for p in prompts
        ),
        default=0,
    )
    pipeline_cfg = PipelineConfig(
        batch_size=config.batch_size // jax.process_count(),
        image_size=model_cfg.vision.image_size,
        num_frames=config.data.num_frames,
        frame_sampling=config.data.frame_sampling,
        crop_scale=tuple(config.data.crop_scale),
        wrap_uint8=config.data.get("wrap_uint8", True),
        crop_native=config.data.get("crop_native", False),
        num_soft_tokens=num_soft_tokens,
        image_token_id=model_cfg.image_token_id,
        text_length=text_length(branch, model_cfg, config.data.max_txt_len, prompt_text),
        prompts=prompts,
        max_txt_len=config.data.max_txt_len,
        end_sym=config.data.end_sym,
        template=config.data.template,
        seed=config.seed,
        worker_count=config.data.worker_count,
        with_audio=branch.reads_audio_track,
        clips_per_video=config.data.clips_per_video,
        cache_decoded=config.data.get("cache_decoded", False),
        read_threads=config.data.get("read_threads", 16),
    )
    return model_cfg, pipeline_cfg


def batch_shapes(
    model_cfg: VideoLlamaConfig, batch_size: int, num_frames: int, text_length: int, clips_per_video: int
) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes of every array a train step may read (the data pipeline's and the feature cache's)."""
    size = model_cfg.vision.image_size
    return {
        "frames": jax.ShapeDtypeStruct((batch_size, num_frames, size, size, 3), jnp.float32),
        "frame_mask": jax.ShapeDtypeStruct((batch_size, num_frames), jnp.bool_),  # an image: frame 0 only
        "audio": jax.ShapeDtypeStruct(
            (batch_size, clips_per_video, 1, *model_cfg.imagebind_audio.input_size), jnp.float32
        ),
        # the frozen towers' outputs, float32 as the towers hand them over (VideoLlama.frame_features, audio_features)
        "video_features": jax.ShapeDtypeStruct(
            (batch_size, num_frames, model_cfg.num_query_tokens, model_cfg.qformer.hidden_size), jnp.float32
        ),
        "audio_features": jax.ShapeDtypeStruct(
            (batch_size, clips_per_video, model_cfg.imagebind_audio.out_dim), jnp.float32
        ),
        "input_ids": jax.ShapeDtypeStruct((batch_size, text_length), jnp.int32),
        "padding_mask": jax.ShapeDtypeStruct((batch_size, text_length), jnp.bool_),
        "labels": jax.ShapeDtypeStruct((batch_size, text_length), jnp.int32),
    }


def cache_layout(branch: Branch, model_cfg: VideoLlamaConfig, pipeline_cfg: PipelineConfig) -> dict:
    """What a frozen-feature cache must match to feed a config's step: branch, audio source and every array's shape."""
    shapes = batch_shapes(model_cfg, 1, pipeline_cfg.num_frames, pipeline_cfg.text_length, pipeline_cfg.clips_per_video)
    return {
        "branch": branch.name,
        "audio_source": branch.audio_source,
        "shapes": {k: list(shapes[k].shape[1:]) for k in branch.batch_keys(cached=True)},
    }


def check_feature_cache(cache_folders: list[str], layout: dict) -> None:
    """Refuse a cache written for another branch, audio source, frame count, text layout or model width."""
    for folder in cache_folders:
        have = read_manifest(folder).get("layout")
        if have != layout:
            raise ValueError(
                f"feature cache {folder} was written for {json.dumps(have)}, but this config's step "
                f"reads {json.dumps(layout)}: rebuild it with vllama-cache for this config"
            )


def folders(spec: str) -> list[str]:
    """A config's comma-separated folder list (`data.shards`, `data.feature_cache`) as paths."""
    return [folder.strip() for folder in spec.split(",") if folder.strip()]


def shards_of(spec: str) -> list[str]:
    """Every shard file the manifests of a comma-separated folder list name."""
    return [path for folder in folders(spec) for path in shard_paths(folder)]


def train_batches(config, model_cfg: VideoLlamaConfig, pipeline_cfg: PipelineConfig, tokenizer):
    """The run's batch iterator (grain, checkpointable): from the frozen-feature cache when `data.feature_cache`
    names one (after checking it was written for this config's layout), else media through the pipeline."""
    if config.data.feature_cache:
        branch = config_branch(config)
        check_feature_cache(folders(config.data.feature_cache), cache_layout(branch, model_cfg, pipeline_cfg))
        return iter(
            make_feature_dataset(
                shards_of(config.data.feature_cache),
                branch.batch_keys(cached=True),
                pipeline_cfg.batch_size,
                seed=config.seed,
            )
        )
    if not config.data.shards:
        raise ValueError(
            "data.shards is empty: point it at vllama-prepare output folders (comma-separated), or "
            "data.feature_cache at vllama-cache output"
        )
    return iter(make_dataset(shards_of(config.data.shards), pipeline_cfg, tokenizer))
