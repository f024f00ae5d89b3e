"""Every orbax checkpoint the project reads or writes, in one place.

- Parameter checkpoints (`save_params` / `restore_params`): the frozen weights a run reads (written once, by
  `vllama-convert` or by the CPU demo's LLM pretraining) and never rewrites, and trainable weights imported from
  a released `.pth`.
- A run's train-state checkpoints (`Checkpointer`): `workdir/checkpoints/<step>/` holds the train state
  (trainable parameters, optimizer state, step, rng, skip count) and the data iterator's position. It owns the
  save cadence, resume-or-initialise, and the saves a preemption or a non-finite stop asks for.
- Weights only (`restore_trainable`): a run directory's newest trainable weights, or a trainable-parameter
  checkpoint, with no optimizer built: what inference and a stage-2 start read.

Restoring places every array directly with its target sharding (each host reads only the pieces its devices
hold) after checking the saved shapes and dtypes against what the model expects, so a wrong checkpoint is
refused with the offending names before any array is read.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from vllama_jax.sharding import with_shardings


def save_params(path: str | Path, params) -> Path:
    """Write `params` (a pytree of arrays) as an orbax checkpoint at `path`, which must not exist yet."""
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite a parameter checkpoint")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()
    return path


def _flat(tree) -> dict[str, object]:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_params(path: str | Path, abstract, shardings=None, *, subset: bool = False):
    """Read the checkpoint at `path` into the structure of `abstract` (ShapeDtypeStructs), each array placed
    with its sharding from `shardings` (same structure) or the abstract leaf's own. Raises ValueError naming
    every missing, unexpected or mis-shaped entry, before reading any array. `subset`: the checkpoint may hold
    more than `abstract` asks for (a step reading cached features needs no tower weights); only what is asked
    for is read."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"parameter checkpoint {path} does not exist")
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            saved = _flat(checkpointer.metadata(path).item_metadata)
        except Exception as err:  # noqa: BLE001 - orbax raises several types for an unreadable directory
            raise ValueError(f"{path} is not a readable orbax checkpoint: {err}") from err
        if not saved:
            raise ValueError(f"{path} is not a readable orbax checkpoint: it holds no array metadata")
        wanted = _flat(abstract)
        problems = [f"missing {k}" for k in wanted if k not in saved]
        problems += [] if subset else [f"unexpected {k}" for k in saved if k not in wanted]
        for key in wanted.keys() & saved.keys():
            want, have = wanted[key], saved[key]
            if tuple(want.shape) != tuple(have.shape) or np.dtype(want.dtype) != np.dtype(have.dtype):
                problems.append(f"{key}: checkpoint has {tuple(have.shape)} {np.dtype(have.dtype)}, "
                                f"the model wants {tuple(want.shape)} {np.dtype(want.dtype)}")
        if problems:
            raise ValueError(f"{path} does not fit this model:\n  " + "\n  ".join(sorted(problems)))
        if shardings is not None:
            abstract = with_shardings(abstract, shardings)
        if not (saved.keys() - wanted.keys()):
            return checkpointer.restore(path, abstract)
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))


def checkpoint_directory(run_dir: str | Path) -> Path:
    """Where a run directory keeps its train-state checkpoints."""
    return (Path(run_dir) / "checkpoints").absolute()


def latest_step(run_dir: str | Path) -> int | None:
    """The newest complete checkpoint of a run directory (orbax commits by an atomic rename, so a half-written one
    does not count), or None."""
    directory = checkpoint_directory(run_dir)
    if not directory.is_dir():
        return None
    with ocp.CheckpointManager(directory) as manager:
        return manager.latest_step()


def restore_trainable(source: str | Path, abstract_trainable):
    """Trainable weights, each in the sharding its abstract leaf carries, from `source`: a run directory (its
    newest checkpoint's `state.trainable`, read alone: no optimizer state is built or read) or a parameter
    checkpoint (`vllama-convert import --part trainable`)."""
    source = Path(source)
    if not checkpoint_directory(source).is_dir():
        return restore_params(source, abstract_trainable)
    step = latest_step(source)
    if step is None:
        raise FileNotFoundError(f"{checkpoint_directory(source)}: no complete checkpoint")
    state = checkpoint_directory(source) / str(step) / "state"
    return restore_params(state, {"trainable": abstract_trainable}, subset=True)["trainable"]


def read_saved(source: str | Path) -> tuple[dict, str]:
    """(arrays, what they are) on the host, as saved, with no model at hand (conversion, inspection): every array of a
    parameter checkpoint, or a run directory's newest trainable weights (read alone, no optimizer state)."""
    source = Path(source)
    if checkpoint_directory(source).is_dir():
        step = latest_step(source)
        if step is None:
            raise FileNotFoundError(f"{checkpoint_directory(source)}: no complete checkpoint")
        state = checkpoint_directory(source) / str(step) / "state"
        with ocp.StandardCheckpointer() as checkpointer:
            saved = checkpointer.metadata(state).item_metadata["trainable"]
        abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
        return restore_params(state, {"trainable": abstract}, subset=True)[
            "trainable"
        ], f"trainable weights of step {step}"
    with ocp.StandardCheckpointer() as checkpointer:
        if not source.is_dir():
            raise FileNotFoundError(f"parameter checkpoint {source.absolute()} does not exist")
        tree = checkpointer.restore(source.absolute())
    return tree, ", ".join(sorted(tree))


class Checkpointer:
    """A run's train-state checkpoints in `workdir/checkpoints`: resume-or-initialise, the save cadence, and the
    saves a stop asks for. Saves are asynchronous; `close` (or leaving the `with` block) waits for them.

    Every `every` steps, at the last step, and whenever `on_step(..., force=True)` (a preemption, a non-finite
    stop), the state and the data iterator's position are saved; the newest `keep` are kept. A half-written
    checkpoint of a killed run (orbax's temporary directory) is removed at start and never resumed from."""

    def __init__(self, workdir: str | Path, *, every: int, keep: int, total_steps: int):
        self.every, self.total_steps = every, total_steps
        self.manager = ocp.CheckpointManager(
            checkpoint_directory(workdir),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=True, cleanup_tmp_directories=True
            ),
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def restore_or_init(
        self,
        abstract_state,
        iterator,
        *,
        fresh: Callable[[], Any],
        from_trainable: Callable[[Any], Any],
        init_trainable: str = "",
        log=print,
    ):
        """The state to start from, in the shardings `abstract_state` (ShapeDtypeStructs) carries: the newest
        checkpoint with the data iterator moved to its position (resume); else, with `init_trainable` (another
        run's directory or a parameter checkpoint, e.g. stage 2 from stage 1), `from_trainable` of those weights
        (a fresh optimizer); else `fresh()`."""
        step = self.manager.latest_step()
        if step is not None:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator)
                ),
            )
            log(f"resumed from step {step}")
            return restored["state"]
        if init_trainable:
            state = from_trainable(restore_trainable(init_trainable, abstract_state.trainable))
            log(f"trainable weights from {init_trainable}")
            return state
        return fresh()

    def on_step(self, step: int, state, iterator, *, force: bool = False) -> bool:
        """Save after `step` when the cadence (or `force`) says so; returns whether it saved."""
        if not (force or step % self.every == 0 or step == self.total_steps):
            return False
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)),
        )
        return True

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
