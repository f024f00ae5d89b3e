"""Multi-host start-up on JAX's own multi-controller runtime (never a home-made scheduler).

TPU pods and SLURM GPU jobs: `jax.distributed.initialize()` finds the coordinator, the process count and this
process's id from the cluster environment. Anywhere else (several local processes, a test): pass them explicitly.
"""
from __future__ import annotations

import os

import jax


def in_cluster() -> bool:
    """True inside a multi-process SLURM job or a multi-host TPU slice, where JAX can auto-detect everything."""
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_hosts = len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    return slurm or tpu_hosts


def initialize(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Join the job's processes into one JAX runtime; a no-op for a single-process run."""
    if coordinator_address is None and not in_cluster():
        return
    # CPU processes exchange collectives over gloo; GPU and TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
