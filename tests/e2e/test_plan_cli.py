"""`vllama-plan` as a user runs it: full-size shapes over simulated devices, nothing allocated."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_cli_plans_llama2_7b_on_four_devices(repo_root, tmp_path):
    """Full-size shapes, nothing allocated: the CLI compiles the 7B stage-1 step over 4 simulated devices."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    out = tmp_path / "plan.json"
    result = subprocess.run(["vllama-plan", "--config=configs/video_llama.py:llama2_7b_chat", "--devices=4",
                             "--mesh=fsdp=4", "--noflops", f"--json={out}"], cwd=repo_root, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (planned,) = json.loads(out.read_text())
    assert planned["global"]["trainable"] == 22_104_064 and planned["devices"] == 4
    frozen_bf16 = planned["global"]["frozen_bytes"]
    assert abs(planned["per_device_parameter_bytes"]["frozen"] - frozen_bf16 / 4) / frozen_bf16 < 0.01
    assert "| v5e |" in result.stdout and "peak" in result.stdout


def test_cli_plans_on_a_tpu_topology_and_refuses_a_mesh_off_the_torus(repo_root, tmp_path):
    """`--topology` compiles with XLA:TPU (libtpu, no TPU): the JSON names the chip and topology; a mesh the torus
    cannot hold is one line naming the meshes that fit."""
    from vllama_jax import tpu_topology

    if tpu_topology.libtpu_version() is None:
        pytest.skip(f"libtpu is not installed: {tpu_topology.INSTALL_HINT}")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    out = tmp_path / "plan.json"
    args = ["vllama-plan", "--config=configs/video_llama.py:llm=tiny", "--topology=v5e:2x2"]
    result = subprocess.run([*args, "--mesh=fsdp=2,tensor=2", f"--json={out}"], cwd=repo_root, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (planned,) = json.loads(out.read_text())
    assert planned["device_kind"] == "TPU v5 lite" and planned["topology"] == "v5e:2x2"
    assert planned["memory"]["compiler_peak_bytes"] > 0 and planned["estimated_step_seconds"] > 0
    assert "compile-only" in result.stdout and "cost-model estimate" in result.stdout

    refused = subprocess.run([*args, "--topology=v5p:4x4x4", "--mesh=data=2,fsdp=32"], cwd=repo_root, env=env,
                             capture_output=True, text=True, timeout=900)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "does not fit the 4x4x4 torus" in refused.stderr and "data=1,fsdp=64,tensor=1" in refused.stderr
