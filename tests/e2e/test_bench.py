"""`python -m vllama_jax.bench --quick`: the report runs end to end inside CI time."""
import json
import os
import subprocess
import sys


def test_quick_report(repo_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    result = subprocess.run([sys.executable, "-m", "vllama_jax.bench", "--quick", f"--json={out}", f"--markdown={md}"],
                            cwd=repo_root, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    print("\n" + md.read_text())
    ts = report["train_step"]
    assert ts["max_loss_diff"] <= 1e-4 and ts["ours_seconds"] > 0 and ts["pytorch_seconds"] > 0
    assert {"torch", "jax", "transformers"} <= set(report["machine"]["versions"])
    assert 0 < report["train_step_tiny"]["ours_seconds"] < ts["ours_seconds"]  # the dispatch-bound comparison
    parts = [p["part"] for p in report["roofline"]["parts"]]
    assert any("ViT" in p for p in parts) and any("LLM backward" in p for p in parts)
    assert 0 < report["roofline"]["fraction_of_peak"]
    assert report["pipeline"]["ratio"] > 1  # seeking beats decoding every frame
    assert all(g["same_tokens"] for g in report["generation"])
    fc = report["feature_cache"]
    assert fc["same_first_loss"] <= 1e-6 and fc["full_flops_ratio"] > 2 and fc["bench_flops_ratio"] > 1
    assert "| **end to end / cached** |" in md.read_text()
