"""`vllama-train --config configs/video_llama.py:tiny --workdir DIR` (ml-collections overrides work; every
process of a TPU pod or SLURM job adds `--distributed`). Exit status 0 when the run is done or preempted (saved),
1 when too many non-finite steps stopped it."""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from vllama_jax.train import distributed
from vllama_jax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/video_llama.py:tiny", "model / data / train config")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl (resumes if present)", required=True)
distributed.define_flags()


def main(argv):
    del argv
    distributed.start_process()
    result = train(_CONFIG.value, _WORKDIR.value)
    print(result)
    return 0 if result["stop"] in ("done", "preempted") else 1  # too many non-finite steps: the run failed


def cli():
    app.run(main)
