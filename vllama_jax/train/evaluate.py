"""Held-out evaluation at the end of training: greedy captions of the eval clips, decoded to text next to their
references, written to `eval.json` and scored when the config names a score (`eval.score`).

Generation here recomputes the LLM over the fixed-length sequence at every new token (one jit, a fori_loop):
captions are a few tokens long and this keeps the code to the model's forward pass. Serving-grade decoding
with a KV cache is `vllama_jax.models.llama.init_cache` / `decode=True`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vllama_jax import sharding
from vllama_jax.config import branch as config_branch
from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.data.pipeline import make_single_pass
from vllama_jax.models.video_llama import Branch, VideoLlama
from vllama_jax.train import shapes_world
from vllama_jax.train.inputs import batch_shapes, shards_of

# eval.score -> score(generated, reference, config, log) -> dict of numbers for eval.json
SCORES = {"shape_attributes": shapes_world.score}


def held_out(config, model: VideoLlama, params, tokenizer, pipeline_cfg, mesh, rules, workdir: Path, log=print) -> dict:
    """Greedy captions of the held-out shards (`data.eval_shards`: eval transform, uniform frames, one pass over
    every clip, the last batch filled up with masked rows), written with their references to workdir/eval.json,
    and scored by `eval.score` when set."""
    batch_size = config.eval.batch_size
    branch = config_branch(config)
    # generation starts right after the prompt, at one position for the whole batch: the longest caption prompt
    # fills it exactly (the pipeline made room for that one), so held-out clips are all asked with it
    longest = max(pipeline_cfg.prompts, key=lambda p: len(tokenizer(p, add_special_tokens=False)["input_ids"]),
                  default=None)
    eval_cfg = dataclasses.replace(pipeline_cfg, batch_size=batch_size // jax.process_count(), train=False,
                                   frame_sampling="uniform", num_epochs=1, worker_count=0,
                                   prompts=(longest,) if longest else ())
    batches = make_single_pass(shards_of(config.data.eval_shards), eval_cfg, tokenizer)
    media = branch.media_keys()
    shapes = batch_shapes(model.config, batch_size, eval_cfg.num_frames, eval_cfg.text_length, eval_cfg.clips_per_video)
    ndims = {**{k: len(shapes[k].shape) for k in (*media, "input_ids", "labels")}, "example_mask": 1}
    shardings = {k: sharding.batch_sharding(mesh, n, rules) for k, n in ndims.items()}
    prompt_length = pipeline_cfg.text_length - pipeline_cfg.max_txt_len  # stage 1's layout: [BOS] + placeholders
    generate = jax.jit(make_greedy_generate(model, prompt_length, config.eval.max_new_tokens, branch))
    started = time.perf_counter()
    generated, reference = caption_dataset(generate, params, batches, tokenizer, shardings, prompt_length,
                                           config.data.end_sym, media)
    result = {"clips": len(reference), "seconds": round(time.perf_counter() - started, 2)}
    if config.eval.score:
        if config.eval.score not in SCORES:
            raise ValueError(f"eval.score {config.eval.score!r}: expected one of {sorted(SCORES)} (or '' for none)")
        result.update(SCORES[config.eval.score](generated, reference, config, log))
    if jax.process_index() == 0:
        samples = [{"generated": g, "reference": r} for g, r in zip(generated, reference)]
        (workdir / "eval.json").write_text(json.dumps({**result, "samples": samples}, indent=1) + "\n")
    return result


def make_greedy_generate(model: VideoLlama, prompt_length: int, max_new_tokens: int, branch: Branch = Branch()):
    """generate(params, media, input_ids) -> (B, max_new_tokens) greedy token ids, for prompts that fill the
    first `prompt_length` positions of `input_ids` (placeholders included); the rest is overwritten. `media` is
    the batch's media arrays ({"frames", "frame_mask"}, {"audio"} or both; `Branch.media_keys`), read by `branch`
    as in training."""

    def generate(params, media, input_ids):
        soft = model.apply({"params": params}, **branch.model_inputs(media), method=VideoLlama.encode)
        ids = input_ids[:, : prompt_length + max_new_tokens]

        def next_token(t, ids):
            embeds = model.apply(
                {"params": params}, ids, soft.get("video"), soft.get("audio"), method=VideoLlama.splice
            )
            logits = model.apply({"params": params}, inputs_embeds=embeds, method=lambda m, **kw: m.llama_model(**kw))
            token = jnp.argmax(logits[:, prompt_length - 1 + t], axis=-1).astype(ids.dtype)
            return ids.at[:, prompt_length + t].set(token)

        ids = jax.lax.fori_loop(0, max_new_tokens, next_token, ids)
        return ids[:, prompt_length:]

    return generate


def _text_until(tokenizer, ids, stop: str) -> str:
    text = tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
    return text.split(stop)[0].strip() if stop else text.strip()


def caption_dataset(
    generate,
    params,
    batches,
    tokenizer,
    batch_shardings,
    prompt_length: int,
    stop: str = "\n",
    media_keys: tuple[str, ...] = ("frames",),
):
    """Run `generate` over every batch of a finite iterator (each process its own rows); returns
    (generated, reference) caption lists for the global batch order, identical on every process."""
    generated, reference = [], []
    for batch in batches:
        inputs = {
            k: jax.make_array_from_process_local_data(batch_shardings[k], batch[k]) for k in (*media_keys, "input_ids")
        }
        media = {k: inputs[k] for k in media_keys}
        tokens = multihost_utils.process_allgather(generate(params, media, inputs["input_ids"]), tiled=True)
        labels = multihost_utils.process_allgather(
            jax.make_array_from_process_local_data(batch_shardings["labels"], batch["labels"]), tiled=True
        )
        keep = multihost_utils.process_allgather(
            jax.make_array_from_process_local_data(batch_shardings["example_mask"], batch["example_mask"]), tiled=True
        )
        for row in np.flatnonzero(np.asarray(keep)):
            generated.append(_text_until(tokenizer, tokens[row], stop))
            answer = labels[row][labels[row] != IGNORE_INDEX]
            reference.append(_text_until(tokenizer, answer, stop))
    return generated, reference
