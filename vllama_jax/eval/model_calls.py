"""The model's side of an evaluation: an example's media and prompt as arrays, and the two jitted calls over a
global batch (greedy generation; the log-likelihood of each option's text).

Every process passes its own rows (`jax.make_array_from_process_local_data`); the global batch is the processes'
rows in process order, sharded over the mesh's batch axes as in training. Prompts are left-padded to a length
every process agrees on (a multiple of `pad_to`), so a batch compiles once per length bucket.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vllama_jax import sharding
from vllama_jax.data import media, records, video
from vllama_jax.eval.readers import Example
from vllama_jax.infer import chat_prompt
from vllama_jax.infer.generate import GenerationConfig, generate, prompt_positions, video_llama_prompt
from vllama_jax.infer.session import Session, decode_tokens
from vllama_jax.models.llama import LlamaForCausalLM
from vllama_jax.models.video_llama import VideoLlama


class MediaError(ValueError):
    """An example's video is missing or cannot be decoded (the run marks and counts the example)."""


@dataclasses.dataclass
class Media:
    frames: np.ndarray  # (T, S, S, 3) normalised
    seconds: list[float] | None


def read_media(example: Example, session: Session) -> Media:
    """The example's frames (uniform over the video, or over its [start, end] window) through the project's
    media functions; MediaError names the file when it is missing or unreadable."""
    path = Path(example.video)
    if not path.is_file():
        raise MediaError(f"{path}: video not found")
    try:
        if example.start is None and example.end is None:
            frames, seconds = media.video_frames(path, session.num_frames, session.image_size)
        else:
            frames, seconds = _window_frames(path, example.start, example.end, session)
    except Exception as err:  # a broken file fails inside PyAV / numpy in many ways; the row records which
        raise MediaError(f"{path}: cannot read the video ({type(err).__name__}: {err})") from err
    return Media(frames, seconds)


def _window_frames(path: Path, start: float | None, end: float | None, session: Session):
    """Uniform frames within [start, end] seconds (MVBench's windowed tasks)."""
    info = records.probe_media(path.read_bytes(), "video")
    fps, total = info["fps"] or 1.0, info["num_frames"]
    first = min(total - 1, max(0, int((start or 0.0) * fps)))
    last = total if end is None else min(total, max(first + 1, int(end * fps) + 1))
    indices, real = video.sample_indices_padded(last - first, session.num_frames, "uniform")
    indices = indices + first
    frames, fps = video.read_frames_seeking(str(path), indices, session.image_size, name=str(path))
    return video.normalize(frames), [float(i) / (fps or 1.0) for i in indices[:real]]


def blank_media(session: Session) -> Media:
    """Zeros in place of a row whose video failed: computed with the batch, never reported."""
    size = session.image_size
    return Media(np.zeros((session.num_frames, size, size, 3), np.float32), None)


def prompt_ids(session: Session, template: str, question: str, item: Media) -> list[int]:
    return chat_prompt.first_turn_ids(session, question, item.seconds, False, "video", template)


def agreed_length(length: int, pad_to: int) -> int:
    """The longest row of the global batch, rounded up to a multiple of pad_to (one value on every process)."""
    longest = int(np.max(multihost_utils.process_allgather(np.asarray([length], np.int32))))
    return -(-longest // pad_to) * pad_to


def left_pad_to(rows: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = True
    return ids, mask


def _global(session: Session, arrays: dict[str, np.ndarray | None]) -> dict:
    out = {}
    for name, x in arrays.items():
        if x is None:
            out[name] = None
            continue
        spec = sharding.batch_sharding(session.mesh, x.ndim, session.rules)
        out[name] = jax.make_array_from_process_local_data(spec, np.asarray(x))
    return out


def batch_ways(session: Session) -> int:
    """How many ways the mesh splits a batch: a global batch must be a multiple of it."""
    spec = sharding.batch_sharding(session.mesh, 1, session.rules).spec[0]
    axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
    return int(np.prod([session.mesh.shape[a] for a in axes]))


def generate_answers(session: Session, items: list[Media], rows: list[list[int]], cfg: GenerationConfig,
                     template: str, end: str | None, pad_to: int) -> list[tuple[str, int]]:
    """(answer text, generated tokens) of every row of the global batch, on every process."""
    key = ("eval_generate", cfg)
    if key not in session.compiled:
        model, llm = session.model, LlamaForCausalLM(session.model.config.llm)

        def run(params, frames, ids, mask):
            embeds, mask = video_llama_prompt(model, params, ids, mask, frames)
            out = generate(llm, params["llama_model"], embeds, mask, cfg)
            return out.tokens, out.lengths

        session.compiled[key] = jax.jit(run)
    ids, mask = left_pad_to(rows, agreed_length(max(map(len, rows)), pad_to), cfg.pad_token_id)
    inputs = _global(session, {"frames": np.stack([x.frames for x in items]), "ids": ids, "mask": mask})
    with jax.set_mesh(session.mesh), nn.logical_axis_rules(session.rules):
        tokens, lengths = session.compiled[key](session.params, *inputs.values())
    tokens, lengths = multihost_utils.process_allgather((tokens, lengths), tiled=True)
    return [(chat_prompt.answer_text(template, decode_tokens(session.tokenizer, t, int(n)), end), int(n))
            for t, n in zip(np.asarray(tokens), np.asarray(lengths))]


def option_loglikelihoods(session: Session, items: list[Media], rows: list[list[int]],
                          options: list[list[list[int]]], num_options: int, pad_to: int) -> np.ndarray:
    """(global batch, num_options) summed log-probabilities of each option's tokens after its row's prompt;
    -inf where a row has fewer options. The media are encoded once per row, the LLM runs once per option."""
    key = ("eval_loglik", num_options)
    if key not in session.compiled:
        model, llm = session.model, LlamaForCausalLM(session.model.config.llm)

        def run(params, frames, ids, mask, scored):  # ids, mask, scored: (B, options, L)
            ids, mask, scored = (x.reshape(-1, x.shape[-1]) for x in (ids, mask, scored))
            video = model.apply({"params": params}, frames, method=VideoLlama.encode)["video"]
            embeds = model.apply({"params": params}, ids, jnp.repeat(video, num_options, axis=0),
                                 method=VideoLlama.splice)
            logits = llm.apply({"params": params["llama_model"]}, inputs_embeds=embeds, padding_mask=mask,
                               positions=prompt_positions(mask))
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
            picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            return jnp.sum(jnp.where(scored[:, 1:], picked, 0.0), axis=-1).reshape(-1, num_options)

        session.compiled[key] = jax.jit(run)
    pad = session.generation_config().pad_token_id
    flat, scored_len, present = [], [], []
    for prompt, opts in zip(rows, options):
        for k in range(num_options):
            tokens = opts[k] if k < len(opts) else opts[0]  # a missing option repeats the first, masked below
            flat.append(prompt + tokens)
            scored_len.append(len(tokens))
            present.append(k < len(opts))
    ids, mask = left_pad_to(flat, agreed_length(max(map(len, flat)), pad_to), pad)
    scored = np.zeros_like(mask)
    for i, n in enumerate(scored_len):
        scored[i, ids.shape[1] - n:] = True
    frames = _global(session, {"frames": np.stack([x.frames for x in items])})["frames"]
    shape = (len(rows), num_options, ids.shape[1])
    per_option = _global(session, {"ids": ids.reshape(shape), "mask": mask.reshape(shape),
                                   "scored": scored.reshape(shape)})
    with jax.set_mesh(session.mesh), nn.logical_axis_rules(session.rules):
        out = session.compiled[key](session.params, frames, **per_option)
    out = np.asarray(multihost_utils.process_allgather(out, tiled=True), np.float64)
    present = np.asarray(multihost_utils.process_allgather(np.asarray(present).reshape(len(rows), -1), tiled=True))
    return np.where(present, out, -np.inf)
