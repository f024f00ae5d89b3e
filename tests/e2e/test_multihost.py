"""Two local CPU processes as one JAX job (coordinator on localhost), each feeding half of every batch."""
import json
import os
import socket
import subprocess

import pytest

from vllama_jax.testing.jobs import SMALL_WORLD, copy_world, losses, override_args
from vllama_jax.testing.jobs import environment as env

SMALL_ARGS = override_args({"batch_size": 2, **SMALL_WORLD, "eval.at_end": False})


@pytest.fixture(scope="module")
def synthetic(small_world):
    return small_world[1]


def prepared(path, synthetic):
    return copy_world(synthetic, path)

ARGS = ["--config=configs/tiny_shapes.py", *SMALL_ARGS, "--config.train.steps=6", "--config.train.checkpoint_every=3",
        "--config.batch_size=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(repo_root, tmp_path, synthetic):  # noqa: F811
    single = prepared(tmp_path / "single", synthetic)
    result = subprocess.run(["vllama-train", *ARGS, f"--workdir={single}"], cwd=repo_root, env=env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    shared = prepared(tmp_path / "two", synthetic)
    port = free_port()
    procs = [
        subprocess.Popen(["vllama-train", *ARGS, f"--workdir={shared}", f"--coordinator_address=localhost:{port}",
                          "--num_processes=2", f"--process_id={i}"],
                         cwd=repo_root, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    one, two = losses(single), losses(shared)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:  # same global batches; only the reduction order differs across two devices
        assert abs(one[step] - two[step]) <= 1e-5, (step, one[step], two[step])
    assert sorted(os.listdir(shared / "checkpoints")) == ["3", "6"]
    # the second process had its own half of the data: its batches were not the first process's
    records = [json.loads(line) for line in (shared / "metrics.jsonl").read_text().splitlines()]
    assert all(r["examples"] == 2 for r in records)  # per-process counts: 2 of each global batch of 4


def test_sigterm_to_one_process_stops_the_job_at_one_step(repo_root, tmp_path, synthetic):  # noqa: F811
    """A preemption signal reaching only process 1 stops both at the same step boundary, with one checkpoint
    there and exit 0; the resumed job finishes with the one-process losses."""
    import signal
    import time

    args = [*ARGS, "--config.train.steps=60", "--config.train.checkpoint_every=1000"]
    single = prepared(tmp_path / "single", synthetic)
    result = subprocess.run(["vllama-train", *args, f"--workdir={single}"], cwd=repo_root, env=env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    shared = prepared(tmp_path / "two", synthetic)

    def start():
        port = free_port()
        return [
            subprocess.Popen(
                [
                    "vllama-train",
                    *args,
                    f"--workdir={shared}",
                    f"--coordinator_address=localhost:{port}",
                    "--num_processes=2",
                    f"--process_id={i}",
                ],
                cwd=repo_root,
                env=env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]

    procs = start()
    metrics, deadline = shared / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 10):
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert all("preempted" in out for out, _ in outputs)
    (stopped,) = os.listdir(shared / "checkpoints")
    assert 10 <= int(stopped) < 60
    procs = start()
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    one, two = losses(single), losses(shared)
    assert sorted(two) == list(range(1, 61))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5, (step, one[step], two[step])
