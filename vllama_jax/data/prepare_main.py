"""`vllama-prepare`: annotation files + media folders -> ArrayRecord shards, a manifest and a rejects list.

    vllama-prepare --format=webvid --annotations=results_2M_train.csv --media_root=videos/ --out=shards/webvid
    vllama-prepare --format=image_caption --annotations=filter_cap.json --media_root=cc_sbu_align/image --out=…
    vllama-prepare --format=llava_instruct --annotations=llava_instruct_150k.json --media_root=coco/train2017 --out=…
    vllama-prepare --format=videochat --annotations=videochat_instruct_11k.json --media_root=videos/ --out=…
    vllama-prepare --format=video_llava --annotations=videochatgpt_tune_.json --media_root=train_data/ --out=…

Flags: `--format`, `--annotations`, `--media_root` (the folder the annotation paths are relative to), `--out`,
`--name` (shard file prefix, default the format), `--records_per_shard` (1000), `--workers` (parallel shard
writers, default one per core). Rerunning the same command after a crash writes only the unfinished shards.
Prints a one-line JSON summary (items, records, rejected, shards).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from absl import app, flags

from vllama_jax.data.prepare import FORMATS, prepare

_FORMAT = flags.DEFINE_enum("format", None, list(FORMATS), "the annotation file's layout", required=True)
_ANNOTATIONS = flags.DEFINE_string("annotations", None, "the CSV / json annotation file", required=True)
_MEDIA_ROOT = flags.DEFINE_string("media_root", None, "the folder the annotation paths are relative to", required=True)
_OUT = flags.DEFINE_string("out", None, "output folder for the shards, manifest.json and rejects.jsonl", required=True)
_NAME = flags.DEFINE_string("name", None, "shard file prefix (default: the format)")
_RECORDS = flags.DEFINE_integer("records_per_shard", 1000, "records per ArrayRecord shard")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "shards written in parallel")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    manifest = prepare(_FORMAT.value, Path(_ANNOTATIONS.value), Path(_MEDIA_ROOT.value), Path(_OUT.value),
                       name=_NAME.value, records_per_shard=_RECORDS.value, workers=_WORKERS.value)
    print(
        json.dumps(
            {k: manifest[k] for k in ("name", "items", "records", "rejected")} | {"shards": len(manifest["shards"])}
        )
    )


def cli():
    app.run(main)
