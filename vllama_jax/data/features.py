"""Frozen-feature shards: the frozen towers' outputs per example, with its tokens, as ArrayRecord records.

A feature cache (written by `vllama-cache`, `vllama_jax.train.feature_cache`) holds, per usable example, the
image Q-Former's per-frame query outputs (`video_features`, (T, 32, 768) at full size) and/or ImageBind's
joint embeddings (`audio_features`, (S, 1024)), stored in the towers' own output dtype (bfloat16 for the
full-size configs; the step casts to float32, which is exact), plus the example's `frame_mask` (an image's
copies masked), `input_ids`, `padding_mask`, `labels` and `repairs` exactly as the media pipeline made them.
Training from it skips the ViT, the image Q-Former and ImageBind. The shards have the same `manifest.json` as
`vllama-prepare`'s, so `shard_paths` reads both.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import grain
import ml_dtypes
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from vllama_jax.data.pipeline import ProcessSlice, Repair, SkipReason

FEATURE_KEYS = ("video_features", "audio_features")
EXAMPLE_KEYS = ("frame_mask", "input_ids", "padding_mask", "labels", "repairs")  # the pipeline's, stored beside them


def _dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def encode(example_id: str, arrays: dict[str, np.ndarray]) -> bytes:
    """One record: an id and named arrays (raw bytes, shape and dtype each)."""
    packed = {
        k: {"dtype": np.dtype(v.dtype).name, "shape": list(v.shape), "data": np.ascontiguousarray(v).tobytes()}
        for k, v in arrays.items()
    }
    return msgpack.packb({"id": example_id, "arrays": packed}, use_bin_type=True)


def decode(record: bytes) -> tuple[str, dict[str, np.ndarray]]:
    fields = msgpack.unpackb(record, raw=False)
    arrays = {k: np.frombuffer(v["data"], _dtype(v["dtype"])).reshape(v["shape"]) for k, v in fields["arrays"].items()}
    return fields["id"], arrays


class FeatureShardWriter:
    """Writes records into numbered ArrayRecord shards in `out` (each under a temporary name, renamed when
    complete), then `manifest.json`. `out` must not hold a manifest already."""

    def __init__(
        self,
        out: str | Path,
        name: str = "features",
        records_per_shard: int = 1000,
        info: dict | None = None,
        manifest_name: str = "manifest.json",
    ):
        self.out, self.name, self.records_per_shard, self.info = Path(out), name, records_per_shard, info or {}
        self.manifest_name = manifest_name
        if (self.out / "manifest.json").exists() or (self.out / manifest_name).exists():
            raise FileExistsError(f"{self.out} already holds a feature cache manifest; refusing to overwrite it")
        self.out.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._writer = None
        self._count = 0

    def write(self, record: bytes) -> None:
        if self._writer is None:
            self._open()
        self._writer.write(record)
        self._count += 1
        if self._count == self.records_per_shard:
            self._close_shard()

    def _open(self):
        self._file = f"{self.name}-{len(self.shards):05d}.array_record"
        self._writer = ArrayRecordWriter(str(self.out / (self._file + ".partial")), "group_size:1")
        self._count = 0

    def _close_shard(self):
        self._writer.close()
        final = self.out / self._file
        os.replace(self.out / (self._file + ".partial"), final)
        digest = hashlib.sha256(final.read_bytes()).hexdigest()
        self.shards.append(
            {"file": self._file, "records": self._count, "bytes": final.stat().st_size, "sha256": digest}
        )
        self._writer = None

    def close(self, **extra) -> dict:
        """Finish the last shard and write the manifest (with `extra` fields, e.g. skip counts)."""
        if self._writer is not None:
            self._close_shard()
        manifest = {
            "name": self.name,
            "format": "features",
            **self.info,
            **extra,
            "records": sum(s["records"] for s in self.shards),
            "shards": self.shards,
        }
        (self.out / self.manifest_name).write_text(json.dumps(manifest, indent=1))
        return manifest


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a feature cache (write one with vllama-cache)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "features":
        raise ValueError(
            f"{path}: format {manifest.get('format')!r}, not a feature cache (write one with vllama-cache)"
        )
    return manifest


class _Decode(grain.transforms.Map):
    """record -> one example with the arrays `keys`, float features as float32 (bfloat16 widens exactly), and
    the media pipeline's bookkeeping fields (a cached example is always usable; its repairs are kept)."""

    def __init__(self, keys: Sequence[str]):
        self.keys = tuple(keys)

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        _, arrays = decode(record)
        missing = [k for k in self.keys if k not in arrays]
        if missing:
            raise KeyError(
                f"feature record lacks {missing} (it holds {sorted(arrays)}): the cache was written for "
                "another branch or by an older vllama-cache; rebuild it with vllama-cache for this config"
            )
        example = {k: arrays[k].astype(np.float32) if k in FEATURE_KEYS else np.array(arrays[k]) for k in self.keys}
        return {
            **example,
            "example_mask": np.bool_(True),
            "skip_reason": np.int32(SkipReason.NONE),
            "repairs": np.int32(arrays["repairs"]) if "repairs" in arrays else np.int32(Repair.NONE),
        }


def make_feature_dataset(
    shard_paths: Sequence[str],
    keys: Sequence[str],
    batch_size: int,
    *,
    seed: int = 42,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Per-host batches of cached examples: the media pipeline's order of operations (repeat → global shuffle
    → this host's rows of each global batch → batch), without the decoding. `keys`: the arrays to read."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(shard_paths)))
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.shuffle(seed=seed).map(_Decode(keys))
    ds = grain.MapDataset.source(ProcessSlice(ds, process_index, process_count, batch_size))
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset()
