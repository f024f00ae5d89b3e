"""Console scripts as a user runs them, one CPU device: `vllama-prepare` on real media, `vllama-cache` on the CPU
demo's world."""
import json
import os
import subprocess
import sys
from pathlib import Path

from vllama_jax.data.features import read_manifest


def test_vllama_prepare_command_writes_shards(webvid, tmp_path):
    root, csv_path, media = webvid
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(
        ["vllama-prepare", "--format", "webvid", "--annotations", str(csv_path), "--media_root", str(media),
         "--out", str(tmp_path), "--records_per_shard", "3", "--workers", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"name": "webvid", "items": 6, "records": 4, "rejected": 2, "shards": 2}


def test_vllama_cache_command_writes_a_cache(small_world, repo_root, tmp_path):
    """The console script, as a user runs it: one CPU device, overrides on the command line, a JSON summary."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    config, _ = small_world
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    out = tmp_path / "cache"
    result = subprocess.run(
        ["vllama-cache", "--config=configs/tiny_shapes.py", f"--out={out}", "--config.batch_size=4",
         f"--config.data.shards={config.data.shards}", f"--config.data.tokenizer={config.data.tokenizer}",
         f"--config.train.frozen_checkpoint={config.train.frozen_checkpoint}", "--records_per_shard=100"],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"records": 12, "shards": 1, "skipped": {}}
    assert read_manifest(out)["records"] == 12
    again = subprocess.run(
        [
            "vllama-cache",
            "--config=configs/tiny_shapes.py",
            f"--out={out}",
            f"--config.data.shards={config.data.shards}",
            f"--config.data.tokenizer={config.data.tokenizer}",
        ],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
