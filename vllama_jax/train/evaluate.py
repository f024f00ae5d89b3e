"""Held-out evaluation during training: greedy captions of eval clips, decoded to text next to their references.

Generation here recomputes the LLM over the fixed-length sequence at every new token (one jit, a fori_loop):
captions are a few tokens long and this keeps the code to the model's forward pass. Serving-grade decoding
with a KV cache is `vllama_jax.models.llama.init_cache` / `decode=True`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.models.video_llama import VideoLlama
from vllama_jax.train.step import model_inputs


def make_greedy_generate(model: VideoLlama, prompt_length: int, max_new_tokens: int, branch: str = "visual",
                         audio_source: str = "frames"):
    """generate(params, media, input_ids) -> (B, max_new_tokens) greedy token ids, for prompts that fill the
    first `prompt_length` positions of `input_ids` (placeholders included); the rest is overwritten. `media` is
    the batch's media arrays ({"frames", "frame_mask"}, {"audio"} or both; `step.media_keys`), read by `branch`
    as in training."""

    def generate(params, media, input_ids):
        soft = model.apply({"params": params}, **model_inputs(media, branch, audio_source), method=VideoLlama.encode)
        ids = input_ids[:, : prompt_length + max_new_tokens]

        def next_token(t, ids):
            embeds = model.apply({"params": params}, ids, soft.get("video"), soft.get("audio"), method=VideoLlama.splice)
            logits = model.apply({"params": params}, inputs_embeds=embeds, method=lambda m, **kw: m.llama_model(**kw))
            token = jnp.argmax(logits[:, prompt_length - 1 + t], axis=-1).astype(ids.dtype)
            return ids.at[:, prompt_length + t].set(token)

        ids = jax.lax.fori_loop(0, max_new_tokens, next_token, ids)
        return ids[:, prompt_length:]

    return generate


def _text_until(tokenizer, ids, stop: str) -> str:
    text = tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
    return text.split(stop)[0].strip() if stop else text.strip()


def caption_dataset(generate, params, batches, tokenizer, batch_shardings, prompt_length: int, stop: str = "\n",
                    media_keys: tuple[str, ...] = ("frames",)):
    """Run `generate` over every batch of a finite iterator (each process its own rows); returns
    (generated, reference) caption lists for the global batch order, identical on every process."""
    generated, reference = [], []
    for batch in batches:
        inputs = {k: jax.make_array_from_process_local_data(batch_shardings[k], batch[k]) for k in (*media_keys, "input_ids")}
        media = {k: inputs[k] for k in media_keys}
        tokens = multihost_utils.process_allgather(generate(params, media, inputs["input_ids"]), tiled=True)
        labels = multihost_utils.process_allgather(jax.make_array_from_process_local_data(batch_shardings["labels"], batch["labels"]), tiled=True)
        keep = multihost_utils.process_allgather(
            jax.make_array_from_process_local_data(batch_shardings["example_mask"], batch["example_mask"]), tiled=True)
        for row in np.flatnonzero(np.asarray(keep)):
            generated.append(_text_until(tokenizer, tokens[row], stop))
            answer = labels[row][labels[row] != IGNORE_INDEX]
            reference.append(_text_until(tokenizer, answer, stop))
    return generated, reference
