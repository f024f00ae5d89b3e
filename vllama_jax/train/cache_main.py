"""`vllama-cache --config configs/video_llama.py:llm=<llm> --out DIR`: the frozen-feature cache of a config's shards
(`vllama_jax.train.feature_cache`); train from it with `--config.data.feature_cache=DIR`."""
from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from vllama_jax.train import distributed
from vllama_jax.train.feature_cache import write_feature_cache

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_shapes.py", "the training config the cache feeds")
_OUT = flags.DEFINE_string("out", None, "new folder for the cache's shards and manifest.json", required=True)
_AUGMENT = flags.DEFINE_bool("augment", False, "freeze one training draw per clip (head-tail frames, random resized "
                             "crop) instead of the eval transform (uniform frames, resize)")
_RECORDS = flags.DEFINE_integer("records_per_shard", 1000, "examples per ArrayRecord shard")
distributed.define_flags()


def main(argv):
    del argv
    distributed.start_process()
    manifest = write_feature_cache(_CONFIG.value, _OUT.value, augment=_AUGMENT.value, records_per_shard=_RECORDS.value)
    print(
        json.dumps(
            {"records": manifest["records"], "shards": len(manifest["shards"]), "skipped": manifest.get("skipped", {})}
        )
    )


def cli():
    app.run(main)
