"""`python -m vllama_jax.bench`: the quick report runs end to end inside CI time, and its loss cross-check against
PyTorch passes for the same weights and fails when the weights differ."""
import json
import os
import subprocess
import sys

import pytest


def _tiny_without_dropout(tiny_config):
    config = tiny_config.copy_and_resolve_references()
    config.model.video_qformer.hidden_dropout = 0.0
    config.model.video_qformer.attention_dropout = 0.0
    return config


def test_cross_check_passes_for_the_same_weights_and_fails_otherwise(tiny_config, monkeypatch):
    from vllama_jax.bench import train_step
    from vllama_jax.testing.torch_reference import TorchVideoLlama

    config = _tiny_without_dropout(tiny_config)
    result = train_step.compare_train_steps(config, batch_size=2, check_steps=3, timed_steps=1, log=lambda *_: None)
    assert result["max_loss_diff"] <= 1e-5 and len(result["losses"]["ours"]) == 3
    assert result["losses"]["ours"][2] != result["losses"]["ours"][0]  # the updates change the loss

    original = TorchVideoLlama.original_state_dict

    def shifted(self):  # our copy of llama_proj gets a different bias than PyTorch's
        state = original(self)
        state["llama_proj.bias"] = state["llama_proj.bias"] + 0.5
        return state

    monkeypatch.setattr(TorchVideoLlama, "original_state_dict", shifted)
    with pytest.raises(AssertionError, match="differs from PyTorch"):
        train_step.compare_train_steps(config, batch_size=2, check_steps=1, timed_steps=1, log=lambda *_: None)


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
