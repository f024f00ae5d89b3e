"""`vllama-train` on the tiny config: exact resume after SIGKILL, SIGTERM saves and exits 0, frozen stays frozen."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS = 150


# the tiny default at test size: fewer clips, a short LLM pretraining, no held-out captioning at the end
SMALL = {"batch_size": 2, "data.synthetic_clips": 12, "data.synthetic_eval_clips": 16, "llm_pretraining.steps": 20,
         "eval.at_end": False}
SMALL_ARGS = [f"--config.{k}={v}" for k, v in SMALL.items()]


def command(workdir):
    return ["vllama-train", "--config=configs/video_llama.py:tiny", f"--workdir={workdir}", *SMALL_ARGS,
            f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=4", "--config.train.log_every=1000"]


def environment():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def losses(workdir):
    """step -> loss, the last record of each step winning (a resumed run rewrites the steps after its checkpoint)."""
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


def run(workdir, repo_root):
    result = subprocess.run(command(workdir), cwd=repo_root, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def interrupt(workdir, repo_root, sig, after_step=9):
    """Start a run and send `sig` once it has logged `after_step` steps; returns the exit code."""
    proc = subprocess.Popen(command(workdir), cwd=repo_root, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = Path(workdir) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_step:
            proc.send_signal(sig)
            break
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    proc.communicate(timeout=300)
    return proc.returncode


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, tiny_config):
    """The tiny default's data, tokenizer and frozen checkpoint at test size, made once: x264 may encode the
    same frames differently from run to run, so every run here trains on the same bytes (a resumed run reuses
    its work directory's anyway)."""
    from vllama_jax.train import tiny_default

    config = tiny_config.copy_and_resolve_references()
    for key, value in SMALL.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    template = tmp_path_factory.mktemp("synthetic")
    tiny_default.prepare(config, template, log=lambda *_: None)
    return template


def workdir_with_data(path, synthetic):
    for name in ("data", "tokenizer", "frozen"):
        shutil.copytree(synthetic / name, path / name)
    return path


@pytest.fixture(scope="module")
def uninterrupted(repo_root, tmp_path_factory, synthetic):
    workdir = workdir_with_data(tmp_path_factory.mktemp("uninterrupted"), synthetic)
    run(workdir, repo_root)
    return losses(workdir)


def test_training_reduces_the_loss(uninterrupted):
    assert len(uninterrupted) == STEPS
    # only the glue trains here, on 12 clips, with the tiny LLM barely pretrained: a modest but clear fall
    first, last = uninterrupted[1], sum(uninterrupted[s] for s in range(STEPS - 9, STEPS + 1)) / 10
    assert last < first - 0.2, (first, last)


def test_sigkill_then_resume_reproduces_the_losses_bitwise(repo_root, tmp_path, synthetic, uninterrupted):
    workdir_with_data(tmp_path, synthetic)
    code = interrupt(tmp_path, repo_root, signal.SIGKILL)
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = max(losses(tmp_path))
    assert killed_at < STEPS
    result = run(tmp_path, repo_root)
    assert "resumed from step" in result.stdout + result.stderr
    assert losses(tmp_path) == uninterrupted  # every step, bit for bit (json keeps the full float)


def test_sigterm_saves_at_the_step_boundary_and_exits_zero(repo_root, tmp_path, synthetic, uninterrupted):
    workdir_with_data(tmp_path, synthetic)
    code = interrupt(tmp_path, repo_root, signal.SIGTERM)
    assert code == 0
    stopped_at = max(losses(tmp_path))
    assert stopped_at < STEPS
    assert str(stopped_at) in os.listdir(tmp_path / "checkpoints")  # saved where it stopped, not at a multiple of 4
    run(tmp_path, repo_root)
    assert losses(tmp_path) == uninterrupted
