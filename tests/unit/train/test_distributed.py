"""Joining a multi-process job (train/distributed.py): explicit --distributed or coordinator flags, JAX's own
cluster detection for the rest, and a refusal when the environment shows other processes but nothing was said.
jax.distributed.initialize is replaced by a recorder: these tests never start a job."""
import jax
import pytest
from absl import flags

from vllama_jax.train import distributed


@pytest.fixture
def joined(monkeypatch):
    """The keyword arguments of every jax.distributed.initialize call (and no change to the CPU collectives)."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    return calls


NOTHING = {"coordinator_address": None, "num_processes": None, "process_id": None}


@pytest.mark.parametrize("environ, sign", [
    ({}, ""),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, ""),
    ({"SLURM_NTASKS": "16"}, "SLURM_NTASKS=16"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "OMPI_COMM_WORLD_SIZE=4"),
    ({"TPU_WORKER_HOSTNAMES": "host-0"}, ""),
    ({"TPU_WORKER_HOSTNAMES": "host-0,host-1,host-2,host-3"}, "TPU_WORKER_HOSTNAMES lists 4 hosts"),
])
def test_in_cluster_reads_the_environment(environ, sign):
    assert distributed.in_cluster(environ) == sign


def test_distributed_joins_with_jax_detection(joined):
    # a plain TPU VM of a pod slice shows nothing in its environment: only the flag makes it join
    assert distributed.initialize(True, environ={}) is True
    assert joined == [NOTHING]  # everything left to jax.distributed's own cluster detection


def test_explicit_coordinator_joins_and_overrides_detection(joined):
    assert distributed.initialize(None, "localhost:1234", 2, 1, environ={"SLURM_NTASKS": "8"}) is True
    assert joined == [{"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1}]


def test_single_process_does_not_join(joined):
    assert distributed.initialize(None, environ={}) is False
    assert distributed.initialize(False, environ={"SLURM_NTASKS": "8"}) is False  # --nodistributed: alone
    assert joined == []


def test_forgotten_distributed_flag_is_refused(joined):
    with pytest.raises(RuntimeError, match="SLURM_NTASKS=8.*Pass --distributed"):
        distributed.initialize(None, environ={"SLURM_NTASKS": "8"})
    with pytest.raises(ValueError, match="--nodistributed contradicts --coordinator_address"):
        distributed.initialize(False, "localhost:1234")
    assert joined == []


@pytest.mark.parametrize("argv, expected", [
    ([], None),
    (["--distributed"], NOTHING),
    (["--coordinator_address=10.0.0.2:8476", "--num_processes=4", "--process_id=3"],
     {"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3}),
])
def test_console_script_flags(joined, monkeypatch, argv, expected):
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    values = flags.FlagValues()
    distributed.define_flags(values)
    values(["vllama-train", *argv])
    assert distributed.initialize_from_flags(values) is (expected is not None)
    assert joined == ([expected] if expected else [])
