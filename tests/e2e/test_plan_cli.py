"""`vllama-plan` as a user runs it: full-size shapes over simulated devices, nothing allocated."""
import json
import os
import subprocess
import sys
from pathlib import Path


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
