"""Multi-host start-up on JAX's own multi-controller runtime (never a home-made scheduler).

Joining a job is explicit. `--distributed` calls `jax.distributed.initialize()`, which finds the coordinator, the
process count and this process's id itself: on TPU pod slices (plain TPU VMs through their metadata server, GKE
through its environment), SLURM (one process per GPU: the i-th task of a node drives the node's i-th GPU) and
Open MPI. Anywhere else (several local processes, a test) `--coordinator_address`, `--num_processes` and
`--process_id` say it. Without either, a process whose environment shows other processes of the same job refuses
to start rather than train alone beside them in the same work directory; `--nodistributed` overrides that.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import jax
from absl import flags, logging


def in_cluster(environ: Mapping[str, str] | None = None) -> str:
    """What in the environment shows that this process is one of several (e.g. "SLURM_NTASKS=16"), or "".

    Only a hint, to catch a forgotten `--distributed`, never a reason to join: a plain TPU VM of a pod slice
    sets no such variable (JAX asks its metadata server), and a SLURM batch script outside `srun` sees its
    allocation's task count while it is one process."""
    environ = os.environ if environ is None else environ
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) > 1:
            return f"{name}={value}"
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"TPU_WORKER_HOSTNAMES lists {len(hosts)} hosts"
    return ""


def initialize(distributed: bool | None = None, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               environ: Mapping[str, str] | None = None) -> bool:
    """Join this process to a multi-process job, before any other JAX call; returns whether it did.

    `distributed`: True joins, JAX detecting whatever of the three is not given; False runs alone; None (not
    said) joins when `coordinator_address` is given and otherwise runs alone, unless `in_cluster` sees other
    processes, which raises (a job of N separate runs would overwrite one another's checkpoints)."""
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    given = [f"--{k}" for k, v in explicit.items() if v is not None]
    if distributed is False and given:
        raise ValueError(f"--nodistributed contradicts {', '.join(given)}: drop one or the other")
    if distributed is None:
        distributed = coordinator_address is not None
        sign = "" if distributed else in_cluster(environ)
        if sign:
            raise RuntimeError(f"{sign}: this process looks like one of several, but --distributed was not given. "
                               "Pass --distributed to join them into one JAX job (the launch/ scripts do), or "
                               "--nodistributed to run this process alone.")
    if not distributed:
        return False
    # CPU processes exchange collectives over gloo; GPU and TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**explicit)
    return True


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """A console script's multi-process flags: `--distributed` and the explicit three (see `initialize`)."""
    flags.DEFINE_boolean("distributed", None, "join a multi-process job through jax.distributed.initialize(), which "
                         "detects TPU pod slices, SLURM and Open MPI; --nodistributed: run alone whatever the "
                         "environment says", flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process job JAX cannot "
                        "detect (e.g. local processes)", flag_values=flag_values)
    flags.DEFINE_integer(
        "num_processes", None, "processes in the job (with --coordinator_address)", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "process_id", None, "this process's index (with --coordinator_address)", flag_values=flag_values
    )


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
    """`initialize` with the values of the flags `define_flags` declared."""
    return initialize(
        flag_values.distributed, flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id
    )


def start_process(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
    """What a console script does first: absl logging at WARNING (unless --verbosity says otherwise), then
    `initialize_from_flags`."""
    if not flag_values["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    return initialize_from_flags(flag_values)
