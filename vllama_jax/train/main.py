"""`vllama-train --config configs/tiny_shapes.py --workdir DIR`: train (or resume) a config in a work directory.

    vllama-train --config configs/tiny_shapes.py --workdir runs/tiny          # the CPU demo; rerun to resume
    vllama-train --config configs/video_llama.py:llm=llama2_7b_chat,recipe=vision_stage1 --workdir gs://…/run \\
        --config.data.shards=shards/webvid --config.data.tokenizer=llama-2-7b-chat-hf --config.mesh.fsdp=8

Flags: `--config` (a config file and its argument; `--config.x=y` overrides any field), `--workdir`, and on every
process of a TPU pod or SLURM job `--distributed` (see `train/distributed.py`). A config whose `data.source` is
"shapes_world" (the CPU demo) first makes its world in the work directory. Exit status 0 when the run is done or
preempted (saved), 1 when too many non-finite steps stopped it.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from vllama_jax.config import require_family
from vllama_jax.train import distributed, shapes_world
from vllama_jax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_shapes.py", "model / data / train config")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl (resumes if present)",
                               required=True)
distributed.define_flags()


def main(argv):
    del argv
    distributed.start_process()
    config = _CONFIG.value
    try:
        require_family(config, "vllama-train")
    except ValueError as err:
        raise app.UsageError(str(err)) from err
    if config.data.get("source") == shapes_world.SOURCE:  # the CPU demo: its clips, tokenizer and frozen LLM
        config = shapes_world.prepare(config, _WORKDIR.value)
    result = train(config, _WORKDIR.value)
    print(result)
    return 0 if result["stop"] in ("done", "preempted") else 1  # too many non-finite steps: the run failed


def cli():
    app.run(main)
