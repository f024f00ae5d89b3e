"""Annotation files + media folders -> ArrayRecord shards, a manifest and a rejects list (`vllama-prepare`, whose
command line is `prepare_main.py`).

Shards are written in parallel (one task per shard), each to a temporary name and renamed when complete, with
a per-shard summary written after it; a rerun skips every shard whose file and summary are both there, so a
crashed ingest resumes. Files that cannot be read go to `rejects.jsonl` with the reason; nothing is dropped
silently. `manifest.json` lists every shard with its record count, size and SHA-256.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

from array_record.python.array_record_module import ArrayRecordWriter

from vllama_jax.data.records import Sample, encode, probe_media

FORMATS = ("webvid", "image_caption", "llava_instruct", "videochat", "video_llava")


@dataclasses.dataclass
class Item:
    """One annotation line: what to read and the text that goes with it (text as raw UTF-8 bytes)."""

    id: str
    kind: str
    path: str  # relative to the media root
    caption: bytes | None = None
    conversation: list[dict[str, bytes]] | None = None


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _read_json(path: Path):
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return json.load(f)


def webvid_items(annotations: Path) -> Iterator[Item]:
    """WebVid CSV: `videoid`, `name` (the caption), `page_dir`; the video is `page_dir/videoid.mp4`."""
    with open(annotations, newline="", encoding="utf-8", errors="surrogateescape") as f:
        for row in csv.DictReader(f):
            yield Item(row["videoid"], "video", f"{row['page_dir']}/{row['videoid']}.mp4", caption=_raw(row["name"]))


def image_caption_items(annotations: Path) -> Iterator[Item]:
    """Image-caption json in the shapes people have: MiniGPT-4 `cc_sbu_align` (`{"annotations": [{"image_id",
    "caption"}]}`, image `{image_id}.jpg`), a list of `{"image", "caption"}`, or LLaVA's CC595k `chat.json`
    (`{"id", "image", "conversations"}`, caption = the first gpt turn)."""
    data = _read_json(annotations)
    if isinstance(data, dict) and "annotations" in data:
        for ann in data["annotations"]:
            yield Item(str(ann["image_id"]), "image", f"{ann['image_id']}.jpg", caption=_raw(ann["caption"]))
        return
    for i, ann in enumerate(data):
        if "caption" in ann:
            yield Item(str(ann.get("id", i)), "image", ann["image"], caption=_raw(ann["caption"]))
        else:
            answer = next(turn["value"] for turn in ann["conversations"] if turn["from"] == "gpt")
            yield Item(str(ann["id"]), "image", ann["image"], caption=_raw(answer))


def llava_instruct_items(annotations: Path) -> Iterator[Item]:
    """LLaVA-Instruct-150K: `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}`."""
    for ann in _read_json(annotations):
        turns = [{"from": _raw(t["from"]), "value": _raw(t["value"])} for t in ann["conversations"]]
        yield Item(str(ann["id"]), "image", ann["image"], conversation=turns)


def videochat_items(annotations: Path) -> Iterator[Item]:
    """VideoChat instruct 11k: `{"video", "QA": [{"q", "a"}]}` (an optional instruction `i` is kept as a system
    turn)."""
    for i, ann in enumerate(_read_json(annotations)):
        turns = [{"from": b"system", "value": _raw(ann["i"])}] if ann.get("i") else []
        for qa in ann["QA"]:
            turns += [{"from": b"human", "value": _raw(qa["q"])}, {"from": b"gpt", "value": _raw(qa["a"])}]
        yield Item(Path(ann["video"]).stem + f"-{i}", "video", ann["video"], conversation=turns)


def video_llava_items(annotations: Path) -> Iterator[Item]:
    """Video-LLaVA's files (`llava_image_.json`, `valley_.json`, `llava_image_tune_.json`,
    `videochatgpt_tune_.json`, `nlp_tune.json`): LLaVA conversations `{"id", "conversations"}` with an `image` or a
    `video` (a path, or a list of one), or neither (text only, kind "text"). A sample with several media is
    rejected at ingest with the reason (one medium per sample here)."""
    for i, ann in enumerate(_read_json(annotations)):
        turns = [{"from": _raw(t["from"]), "value": _raw(t["value"])} for t in ann["conversations"]]
        media = [(kind, p) for kind in ("image", "video") if kind in ann
                 for p in (ann[kind] if isinstance(ann[kind], list) else [ann[kind]])]
        kind, path = media[0] if len(media) == 1 else ("text", "") if not media else ("several", json.dumps(media))
        yield Item(str(ann.get("id", i)), kind, path, conversation=turns)


READERS = {
    "webvid": webvid_items,
    "image_caption": image_caption_items,
    "llava_instruct": llava_instruct_items,
    "videochat": videochat_items,
    "video_llava": video_llava_items,
}


def shard_name(name: str, index: int, count: int) -> str:
    return f"{name}-{index:05d}-of-{count:05d}.array_record"


def _write_shard(task) -> dict:
    """Write one shard (to a temporary name, then rename) and its summary; return the summary."""
    out, name, dataset, index, count, media_root, items = task
    final = out / shard_name(name, index, count)
    tmp = final.with_suffix(".tmp")
    rejects, written = [], 0
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    try:
        for item in items:
            item = Item(**item)
            path = media_root / item.path
            try:
                if item.kind == "several":
                    raise ValueError(f"{len(json.loads(item.path))} media in one sample (one per sample is supported)")
                data = b"" if item.kind == "text" else path.read_bytes()
                meta = {} if item.kind == "text" else probe_media(data, item.kind)
            except (OSError, ValueError) as err:
                rejects.append({"id": item.id, "path": str(path), "reason": str(err)})
                continue
            sample = Sample(item.id, dataset, item.kind, data, item.path, item.caption, item.conversation, **meta)
            writer.write(encode(sample))
            written += 1
    finally:
        writer.close()
    os.replace(tmp, final)
    digest = hashlib.sha256(final.read_bytes()).hexdigest()
    summary = {
        "file": final.name,
        "records": written,
        "bytes": final.stat().st_size,
        "sha256": digest,
        "rejects": rejects,
    }
    summary_path = out / f"{final.name}.json"
    summary_path.with_suffix(".tmp").write_text(json.dumps(summary))
    os.replace(summary_path.with_suffix(".tmp"), summary_path)
    return summary


def prepare(
    fmt: str,
    annotations: Path,
    media_root: Path,
    out: Path,
    *,
    name: str | None = None,
    records_per_shard: int = 1000,
    workers: int = 1,
    log=print,
) -> dict:
    """Build (or finish building) the shards for one annotation file; returns the manifest."""
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {FORMATS}")
    name = name or fmt
    out.mkdir(parents=True, exist_ok=True)
    items = [dataclasses.asdict(i) for i in READERS[fmt](annotations)]
    count = max(1, -(-len(items) // records_per_shard))
    tasks, summaries = [], {}
    for index in range(count):
        final = out / shard_name(name, index, count)
        summary_path = out / f"{final.name}.json"
        if final.exists() and summary_path.exists():
            summaries[index] = json.loads(summary_path.read_text())
            continue
        chunk = items[index * records_per_shard : (index + 1) * records_per_shard]
        tasks.append((out, name, fmt, index, count, media_root, chunk))
    log(f"{len(items)} items in {count} shards; {len(summaries)} already done, {len(tasks)} to write")
    if tasks:
        with multiprocessing.get_context("spawn").Pool(max(1, workers)) if workers > 1 else _Serial() as pool:
            for done, summary in enumerate(pool.imap_unordered(_write_shard, tasks), 1):
                summaries[int(summary["file"].split("-")[-3])] = summary
                log(
                    f"  [{done}/{len(tasks)}] {summary['file']}: {summary['records']} records, "
                    f"{len(summary['rejects'])} rejected"
                )
    shards = [summaries[i] for i in range(count)]
    rejects = [r for s in shards for r in s["rejects"]]
    with open(out / "rejects.jsonl", "w") as f:
        for r in rejects:
            f.write(json.dumps(r) + "\n")
    manifest = {
        "name": name,
        "format": fmt,
        "annotations": str(annotations),
        "items": len(items),
        "records": sum(s["records"] for s in shards),
        "rejected": len(rejects),
        "shards": [{k: s[k] for k in ("file", "records", "bytes", "sha256")} for s in shards],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


class _Serial:
    """The pool interface, in this process (workers=1 keeps tracebacks simple)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, tasks):
        return map(fn, tasks)


def shard_paths(out: str | Path) -> list[str]:
    """The shard files a manifest lists, verified to exist."""
    out = Path(out)
    manifest = json.loads((out / "manifest.json").read_text())
    paths = [out / s["file"] for s in manifest["shards"]]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{out}/manifest.json lists missing shards: {missing[:3]}")
    return [str(p) for p in paths]
