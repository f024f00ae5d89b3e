"""Helpers for tests that start jobs (console scripts, runs in a work directory) and read what they wrote."""
import json
import os
import shutil
import sys
from pathlib import Path

# The CPU demo's world at test size (configs/tiny_shapes.py with these overrides): 12 training and 8 held-out clips
# and a short LLM pretraining. Made once per test session (tests/conftest.py: small_world) and copied from there.
SMALL_WORLD = {"data.synthetic_clips": 12, "data.synthetic_eval_clips": 8, "llm_pretraining.steps": 20}


def apply_overrides(config, overrides: dict):
    """`config` with dotted-key overrides set in place ({"data.synthetic_clips": 12}); returns it."""
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        node = config
        for part in filter(None, section.split(".")):
            node = node[part]
        node[name] = value
    return config


def override_args(overrides: dict) -> list[str]:
    """The same overrides as ml-collections command-line flags."""
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def environment() -> dict:
    """The environment a job runs in as a user starts it: one CPU device (no simulated ones), this interpreter's
    console scripts first on PATH; the rest (the compilation cache the tests share) inherited."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def copy_world(template: Path, path: Path) -> Path:
    """A work directory holding the world's data, tokenizer and frozen checkpoint (the same bytes every time)."""
    for name in ("data", "tokenizer", "frozen"):
        shutil.copytree(Path(template) / name, Path(path) / name)
    return Path(path)


def losses(workdir) -> dict[int, float]:
    """step -> loss, the last record of each step winning (a resumed run rewrites the steps after its checkpoint)."""
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


def checkpoint_steps(workdir) -> tuple[list[int], list[str]]:
    """The run's checkpoint directory, as step numbers (complete checkpoints) and other names (anything else)."""
    names = os.listdir(Path(workdir) / "checkpoints")
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if not n.isdigit())


def restore_state(workdir, step: int) -> dict:
    """The train state a run saved at `step`, as saved."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore((Path(workdir) / "checkpoints" / str(step) / "state").absolute())
