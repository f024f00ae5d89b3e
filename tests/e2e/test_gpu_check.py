"""`launch/gpu_check.py --dry_run`: the GPU check's every run (ours per attention implementation, PyTorch under bf16
and fp16 autocast, for both steps) on a CPU at a tiny size, in a process where the libraries a GPU machine may lack
cannot be imported."""
import json
import math
import subprocess
import sys

# what the check must not need: the data pipeline's, the media decoders', the configs' and the checkpoints' libraries
UNAVAILABLE = ("grain", "av", "ml_collections", "array_record", "librosa", "tensorflow_datasets", "orbax")


def test_dry_run_without_the_data_and_checkpoint_libraries(repo_root, tmp_path):
    out = tmp_path / "gpu_check.json"
    # a None entry in sys.modules makes `import name` (and `import name.sub`) raise ImportError
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({UNAVAILABLE!r})); "
            f"sys.argv = ['launch/gpu_check.py', '--dry_run', '--json={out}']; "
            "runpy.run_path('launch/gpu_check.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout)
    assert "| ours, attention xla |" in result.stdout and "| PyTorch, float16 autocast |" in result.stdout

    report = json.loads(out.read_text())
    assert report["dry_run"] and report["problems"] == []
    assert set(report["steps"]) == {"bench", "llama2_7b_4_layers"}
    for name, step in report["steps"].items():
        model = step["model"]
        # the full-size recipe's precision: frozen towers in bf16, the trainable glue in float32
        assert model["vision"]["param_dtype"] == model["llm"]["param_dtype"] == "bfloat16"
        assert model["video_qformer"]["param_dtype"] == "float32"
        assert model["llm"]["scan_layers"] == (name == "llama2_7b_4_layers")
        assert step["flops"] > 0
        runs = {(r["framework"], r.get("attention_impl") or r.get("autocast")): r for r in step["runs"]}
        assert runs["jax", "splash"]["status"] == "not run" and "TPU" in runs["jax", "splash"]["reason"]
        done = [r for r in runs.values() if r["status"] == "ok"]
        assert {k for k, r in runs.items() if r["status"] == "ok"} == {
            ("jax", "xla"), ("jax", "dot_product_attention"), ("pytorch", "bfloat16"), ("pytorch", "float16")}
        for run in done:
            assert math.isfinite(run["first_loss"]) and run["loss_diff"] <= 0.05
            assert run["step_seconds"] > 0 and run["tflops_per_second"] > 0 and run["mfu"] is None  # no CPU peak
        assert set(runs["jax", "xla"]["pytorch_over_ours"]) == {"bfloat16", "float16"}
