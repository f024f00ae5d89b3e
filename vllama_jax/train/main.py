"""`vllama-train --config configs/video_llama.py:tiny --workdir DIR` (ml-collections overrides work)."""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from vllama_jax.train import distributed
from vllama_jax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/video_llama.py:tiny", "model / data / train config")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl (resumes if present)", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process job outside SLURM / TPU pods")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    result = train(_CONFIG.value, _WORKDIR.value)
    print(result)


def cli():
    app.run(main)
