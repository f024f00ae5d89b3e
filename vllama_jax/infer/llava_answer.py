"""Answering with a Video-LLaVA model from Python: a question about a video or an image → the original's
evaluation prompt (`llava_v1`, the medium's tag first) → soft tokens spliced → the project's cached decoding.

    answer(model, params, tokenizer, "What happens?", video=frames)   # frames from data.llava_video.load_video

`vllama-chat` / `vllama-caption` do not serve this family yet (docs/video_llava.md); this is the path they would
call. Generation settings are `infer.generate.GenerationConfig` (greedy by default; the original's QA script
samples at temperature 0, which transformers of its time treated as greedy-like).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vllama_jax.data.llava_conversation import IMAGE_TAG, VIDEO_TAG, prompt_ids, splice_placeholders
from vllama_jax.infer.generate import GenerationConfig, generate
from vllama_jax.models.llama import LlamaForCausalLM
from vllama_jax.models.video_llava import VideoLlava


def prompt(model: VideoLlava, tokenizer, question: str, *, video=None, image=None) -> np.ndarray:
    """The prompt's ids (1, P) with the model's placeholders: `<video>\\n` or `<image>\\n` before the question."""
    if (video is None) == (image is None):
        raise ValueError("give exactly one of video and image")
    cfg = model.config
    tag = VIDEO_TAG if video is not None else IMAGE_TAG
    ids = prompt_ids(tokenizer, [{"from": "human", "value": f"{tag}\n{question}"}], cfg.video_tower.num_frames)
    spliced, _ = splice_placeholders(ids, np.zeros_like(ids), image_tokens=cfg.image_tokens,
                                     frame_tokens=cfg.video_tokens // cfg.video_tower.num_frames,
                                     image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                                     max_length=None)
    return spliced[None]


def answer_tokens(model: VideoLlava, params: dict, ids: np.ndarray, *, video=None, image=None,
                  cfg: GenerationConfig = GenerationConfig(), rng=None) -> list[int]:
    """The generated token ids after `prompt` ids (1, P), the video (T, H, W, 3) or image (H, W, 3) spliced in."""
    media = {"videos": None if video is None else jnp.asarray(video)[None],
             "images": None if image is None else jnp.asarray(image)[None]}
    embeds = jax.jit(lambda p, x: model.apply({"params": p}, x, **media, method=VideoLlava.prompt_embeds))(
        params, jnp.asarray(ids))
    run = jax.jit(functools.partial(generate, LlamaForCausalLM(model.config.llm), cfg=cfg))
    out = run(params["language_model"], embeds, jnp.ones(ids.shape, bool), rng=rng)
    return [int(t) for t in np.asarray(out.tokens[0, : int(out.lengths[0])])]


class Answer(NamedTuple):
    text: str
    tokens: list[int]
    prompt: np.ndarray  # (1, P) ids with the model's placeholders


def answer(model: VideoLlava, params: dict, tokenizer, question: str, *, video=None, image=None,
           cfg: GenerationConfig | None = None, rng=None) -> Answer:
    """The model's answer to `question` about `video` or `image` (preprocessed frames)."""
    cfg = cfg or GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id or tokenizer.unk_token_id or 0)
    ids = prompt(model, tokenizer, question, video=video, image=image)
    tokens = answer_tokens(model, params, ids, video=video, image=image, cfg=cfg, rng=rng)
    return Answer(tokenizer.decode(tokens, skip_special_tokens=True), tokens, ids)
