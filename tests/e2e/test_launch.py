"""launch/ scripts, run with stand-ins for gcloud, srun and vllama-train that record their arguments: every
process gets --distributed, and every argument arrives as it was given (spaces, quotes, globs)."""
import os
import re
import subprocess
from pathlib import Path

import pytest

AWKWARD = [
    "--config.data.shards=a dir/shards,b",
    "--config.name=it's \"tiny\"",
    "--config.data.tokenizer=*",
    "--x=$HOME;ls",
]


def recorder(bin_dir: Path, name: str, out: Path) -> None:
    """An executable `name` that writes its arguments, NUL-separated, to `out`."""
    script = bin_dir / name
    script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > {out}\n')
    script.chmod(0o755)


def arguments(path: Path) -> list[str]:
    return path.read_text().split("\0")[:-1]


@pytest.fixture
def fake_bin(tmp_path):
    (tmp_path / "bin").mkdir()
    return tmp_path / "bin"


def run(script, args, fake_bin, **env):
    environment = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", **env}
    subprocess.run(["bash", script, *args], check=True, env=environment, timeout=60)


def test_tpu_pod_quotes_every_argument_for_the_workers(repo_root, tmp_path, fake_bin):
    recorder(fake_bin, "gcloud", tmp_path / "gcloud_args")
    run(
        repo_root / "launch/tpu_pod.sh",
        ["configs/video_llama.py:tiny", "gs://bucket/my run", *AWKWARD],
        fake_bin,
        TPU_NAME="pod",
        ZONE="zone",
    )
    gcloud = arguments(tmp_path / "gcloud_args")
    assert gcloud[:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone"] and "--worker=all" in gcloud
    command = gcloud[gcloud.index("--command") + 1]
    # what each worker's shell runs: in ~/vllama-jax, vllama-train with exactly the arguments given
    (tmp_path / "home" / "vllama-jax").mkdir(parents=True)
    recorder(fake_bin, "vllama-train", tmp_path / "train_args")
    subprocess.run(
        ["bash", "-c", command],
        check=True,
        timeout=60,
        env={**os.environ, "HOME": str(tmp_path / "home"), "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"},
    )
    assert arguments(tmp_path / "train_args") == [
        "--distributed",
        "--config",
        "configs/video_llama.py:tiny",
        "--workdir",
        "gs://bucket/my run",
        *AWKWARD,
    ]


def test_slurm_runs_one_distributed_process_per_gpu(repo_root, tmp_path, fake_bin):
    script = repo_root / "launch/slurm_gpu.sbatch"
    recorder(fake_bin, "srun", tmp_path / "srun_args")
    run(script, ["configs/video_llama.py:llama2_7b_chat", "/shared/run", *AWKWARD], fake_bin)
    srun = arguments(tmp_path / "srun_args")
    assert srun == [
        "--gpu-bind=none",
        "vllama-train",
        "--distributed",
        "--config",
        "configs/video_llama.py:llama2_7b_chat",
        "--workdir",
        "/shared/run",
        *AWKWARD,
    ]
    # JAX's SLURM detection drives GPU SLURM_LOCALID of the node's GPUs: as many tasks as GPUs, none bound to one
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", script.read_text(), re.M))
    assert options["ntasks-per-node"] == options["gpus-per-node"] and "gpus-per-task" not in options
