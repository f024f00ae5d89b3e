"""`vllama-demo`, the smoke test, as a subprocess on the tiny config; and CI runs the README's test command."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = ["vllama-demo", "--config=configs/video_llama.py:tiny", "--config.batch_size=2"]


def run_cli(repo_root: Path, args: list[str], tmp_path: Path, batch: int = 2) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user runs it
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this interpreter's scripts
    result = subprocess.run(
        [*args, f"--workdir={tmp_path}"], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"soft tokens: ({batch}, 4, 64)"), result.stdout
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def demo_run(repo_root, tmp_path_factory):
    """The smoke-test command, run once for the tests below."""
    tmp_path = tmp_path_factory.mktemp("demo")
    return run_cli(repo_root, DEMO, tmp_path), tmp_path


def test_demo_command(demo_run):
    out, tmp_path = demo_run
    assert out["soft_tokens_shape"] == [2, 4, 64]
    assert math.isfinite(out["caption_loss"]) and 4.0 < out["caption_loss"] < 9.0  # ~ln(512) for random weights
    assert out["caption_tokens"] > 0
    assert (tmp_path / "clip.mp4").stat().st_size > 0 and (tmp_path / "tokenizer").is_dir()


def test_command_line_overrides(repo_root, demo_run, tmp_path):
    base = demo_run[0]
    deeper = run_cli(
        repo_root, [*DEMO, "--config.model.llm.num_layers=3"], tmp_path
    )
    # one more LLaMA layer of the tiny size: 2 norms + 4 attention + 3 MLP matrices
    per_layer = 2 * 64 + (64 * 64 + 2 * 64 * 32 + 64 * 64) + 3 * 64 * 128
    assert deeper["parameters"] - base["parameters"] == per_layer
    assert deeper["trainable_parameters"] == base["trainable_parameters"]


def test_launch_script_on_simulated_mesh(repo_root, demo_run, tmp_path):
    single = demo_run[0]
    sharded = run_cli(repo_root, ["bash", "launch/simulated_mesh.sh"], tmp_path, batch=4)
    assert sharded["devices"] == 8 and sharded["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    # the batch repeats one example, so the mean loss is the single-device one
    assert abs(sharded["caption_loss"] - single["caption_loss"]) < 1e-5
