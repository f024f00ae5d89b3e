"""Parameter checkpoints outside the train state: the frozen weights a run reads (written once, by conversion
or by the tiny default's LLM pretraining) and never rewrites.

Restoring places every array directly with its target sharding (each host reads only the pieces its devices
hold) after checking the saved shapes and dtypes against what the model expects, so a wrong checkpoint is
refused with the offending names before any array is read.
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


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
            abstract = jax.tree_util.tree_map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
        if not (saved.keys() - wanted.keys()):
            return checkpointer.restore(path, abstract)
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))
