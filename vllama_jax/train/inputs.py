"""What a config's examples look like: the model config with the tokenizer's placeholder ids, and the data
pipeline's config (text layout, frames, audio). Shared by the trainer and the frozen-feature cache, so that a
cached example is token for token the example training would have made."""
from __future__ import annotations

import dataclasses

import jax

from vllama_jax.config import model_config
from vllama_jax.constants import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER
from vllama_jax.data.pipeline import PipelineConfig
from vllama_jax.models.video_llama import VideoLlamaConfig
from vllama_jax.train.step import media_keys


def model_and_pipeline(config, tokenizer) -> tuple[VideoLlamaConfig, PipelineConfig]:
    """(model config, this process's pipeline config) for a training config and its tokenizer."""
    branch, audio_source = config.train.branch, config.data.audio_source
    model_cfg = dataclasses.replace(model_config(config), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))
    num_soft_tokens, prompts = model_cfg.num_video_query_tokens, tuple(config.data.get("caption_prompts", ()))
    if branch == "audio":  # the original's audio stages put their 8 soft tokens at <ImageHere> placeholders too
        model_cfg = dataclasses.replace(model_cfg, audio_token_id=model_cfg.image_token_id)
        num_soft_tokens = model_cfg.num_audio_query_tokens
    elif branch == "audio_visual":  # [BOS] + audio block + video block + caption (the demo's order)
        model_cfg = dataclasses.replace(model_cfg, audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER))
        prompts = (AUDIO_PLACEHOLDER * model_cfg.num_audio_query_tokens + IMAGE_PLACEHOLDER,)
    placeholders = num_soft_tokens + (model_cfg.num_audio_query_tokens if branch == "audio_visual" else 0)
    # room for the longest caption prompt's text (the placeholders are counted above)
    prompt_text = max((len(tokenizer(p.replace(IMAGE_PLACEHOLDER, "").replace(AUDIO_PLACEHOLDER, ""),
                                     add_special_tokens=False)["input_ids"]) for p in prompts), default=0)
    pipeline_cfg = PipelineConfig(
        batch_size=config.batch_size // jax.process_count(),
        image_size=model_cfg.vision.image_size,
        num_frames=config.data.num_frames,
        frame_sampling=config.data.frame_sampling,
        crop_scale=tuple(config.data.crop_scale),
        num_soft_tokens=num_soft_tokens,
        image_token_id=model_cfg.image_token_id,
        text_length=1 + placeholders + prompt_text + config.data.max_txt_len,
        prompts=prompts,
        max_txt_len=config.data.max_txt_len,
        end_sym=config.data.end_sym,
        template=config.data.template,
        seed=config.seed,
        worker_count=config.data.worker_count,
        with_audio="audio" in media_keys(branch, audio_source),
        clips_per_video=config.data.clips_per_video,
    )
    return model_cfg, pipeline_cfg
