"""`vllama-caption`: caption (or ask one question about) every video in a folder or a vllama-prepare shard set.

    vllama-caption --config configs/tiny_shapes.py --ckpt runs/tiny --videos clips/ --out captions.jsonl
    vllama-caption --config ... --ckpt ... --shards data/eval --question "What is moving?" --out qa.jsonl

Without --question the prompt is stage 1's ([BOS] + the soft tokens; the audio block first for audio-visual
runs) and the caption ends at the config's end_sym; with --question it is the chat template's first turn.
Writes one JSON line per item ({"id", "caption", "tokens"} or {"id", "error"} for media that cannot be read,
which are skipped and counted), a progress bar on stderr, and a throughput summary at the end.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vllama_jax.config import require_family
from vllama_jax.data import media, records
from vllama_jax.data.prepare import shard_paths
from vllama_jax.infer import chat_prompt
from vllama_jax.infer.session import Session, decode_tokens, left_pad, load_session

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_shapes.py", "model / data / mesh config")
_CKPT = flags.DEFINE_string("ckpt", None, "a vllama-train run directory (or a trainable-parameter checkpoint)")
_VIDEOS = flags.DEFINE_string("videos", None, "a folder of videos to caption")
_SHARDS = flags.DEFINE_string("shards", None, "a vllama-prepare output folder to caption")
_OUT = flags.DEFINE_string("out", "captions.jsonl", "the JSONL file to write")
_QUESTION = flags.DEFINE_string("question", None, "ask this about each item instead of captioning it")
_AUDIO = flags.DEFINE_bool("audio", False, "also listen to each video's audio track (audio-branch models)")
_BATCH = flags.DEFINE_integer("batch_size", 8, "items per generation call")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "tokens per answer at most")
_BEAMS = flags.DEFINE_integer("num_beams", 1, "beam search width (1 = greedy)")


def folder_items(folder: str | Path) -> Iterator[tuple[str, str, object]]:
    """(id, kind, source) for each video file of a folder, in name order."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{folder}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    for path in paths:
        yield path.name, "video", str(path)


def shard_items(folder: str | Path) -> Iterator[tuple[str, str, object]]:
    """(id, kind, encoded bytes) for each record of a vllama-prepare shard set."""
    import grain

    source = grain.sources.ArrayRecordDataSource(shard_paths(folder))
    for i in range(len(source)):
        sample = records.decode(source[i])
        yield sample.id, sample.kind, sample.media


def read_item(kind: str, source, session: Session, with_audio: bool, name: str | None = None) -> dict:
    """The model inputs of one item: frames (T, S, S, 3) [+ fbank clips], and the frame times for the prompt, read
    by `data.media` as chat and the pipeline read them. `source` is a path or encoded bytes (`name` labels them)."""
    clips = session.config.data.clips_per_video if with_audio else None
    return media.item_inputs(kind, source, session.image_size, session.num_frames, clips, name)


def prompt_ids(
    session: Session, template: str, question: str | None, kind: str, seconds, with_audio: bool
) -> list[int]:
    """Stage 1's prompt ([BOS] + soft tokens) without a question, else the template's first turn."""
    return chat_prompt.first_turn_ids(session, question or "", seconds, with_audio, kind, template)


def caption_all(
    session: Session,
    items,
    out_path: Path,
    question: str | None,
    with_audio: bool,
    batch_size: int,
    max_new_tokens: int,
    num_beams: int,
    log=print,
) -> dict:
    """Caption every item, writing JSONL as batches finish; returns the throughput summary."""
    from tqdm import tqdm

    template = "caption" if question is None else session.config.data.get("template", "vicuna")
    end = session.config.data.end_sym if question is None else None
    cfg = session.generation_config(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        stop_sequences=chat_prompt.stop_sequences(session, end, template),
    )
    counts = {"items": 0, "skipped": 0, "tokens": 0}
    started = time.perf_counter()
    generate_seconds = 0.0
    pending: list[tuple[str, dict]] = []

    def flush(out):
        nonlocal generate_seconds
        if not pending:
            return
        ids, mask = left_pad(
            [prompt_ids(session, template, question, x["kind"], x["seconds"], with_audio) for _, x in pending],
            session.generation_config().pad_token_id,
        )
        frames = np.stack([x["frames"] for _, x in pending])
        clips = np.stack([x["audio"] for _, x in pending]) if with_audio else None
        t0 = time.perf_counter()
        result = jax.device_get(session.generate(ids, mask, frames, clips, cfg))
        generate_seconds += time.perf_counter() - t0
        for row, (item_id, _) in enumerate(pending):
            length = int(result.lengths[row])
            text = chat_prompt.answer_text(template, decode_tokens(session.tokenizer, result.tokens[row], length), end)
            out.write(json.dumps({"id": item_id, "caption": text, "tokens": length}) + "\n")
            counts["tokens"] += length
        counts["items"] += len(pending)
        pending.clear()

    with open(out_path, "w") as out, tqdm(desc="captioning", unit="clip", file=sys.stderr) as bar:
        for item_id, kind, source in items:
            try:
                inputs = read_item(kind, source, session, with_audio, name=item_id)
            except ValueError as err:  # unreadable media: recorded, counted, skipped
                out.write(json.dumps({"id": item_id, "error": str(err)}) + "\n")
                counts["skipped"] += 1
                bar.update(1)
                continue
            if pending and pending[0][1]["frames"].shape != inputs["frames"].shape:
                flush(out)  # images (1 frame) and videos go in separate batches
            pending.append((item_id, inputs))
            if len(pending) == batch_size:
                flush(out)
            bar.update(1)
        flush(out)
    seconds = time.perf_counter() - started
    summary = {
        **counts,
        "seconds": round(seconds, 2),
        "clips_per_second": round(counts["items"] / seconds, 3),
        "generate_seconds": round(generate_seconds, 2),
        "generated_tokens_per_second": round(counts["tokens"] / max(generate_seconds, 1e-9), 1),
    }
    log(
        f"captioned {counts['items']} items ({counts['skipped']} skipped) in {seconds:.1f} s: "
        f"{summary['clips_per_second']} clips/s, {summary['generated_tokens_per_second']} generated tokens/s "
        f"(generation incl. compile); wrote {out_path}"
    )
    return summary


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        require_family(_CONFIG.value, "vllama-caption")
    except ValueError as err:
        raise app.UsageError(str(err)) from err
    if bool(_VIDEOS.value) == bool(_SHARDS.value):
        raise app.UsageError("give exactly one of --videos and --shards")
    session = load_session(_CONFIG.value, _CKPT.value, log=lambda m: print(m, file=sys.stderr))
    items = folder_items(_VIDEOS.value) if _VIDEOS.value else shard_items(_SHARDS.value)
    summary = caption_all(
        session,
        items,
        Path(_OUT.value),
        _QUESTION.value,
        _AUDIO.value,
        _BATCH.value,
        _MAX_NEW.value,
        _BEAMS.value,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(json.dumps(summary))


def cli():
    app.run(main)
