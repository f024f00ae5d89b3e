"""`vllama-train --config configs/video_llama.py:tiny --workdir DIR` (ml-collections overrides work)."""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from vllama_jax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/video_llama.py:tiny", "model / data / train config")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl (resumes if present)", required=True)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    result = train(_CONFIG.value, _WORKDIR.value)
    print(result)


def cli():
    app.run(main)
