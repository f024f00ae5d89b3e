"""TPU slices without a TPU: compile-only devices of a named topology, so that the TPU compiler itself (XLA:TPU, in
libtpu) compiles the project's steps on any machine, as MaxText's train_compile.py does. `vllama-plan --topology`
reads its memory and cost analyses from these.

    devices = tpu_topology.devices("v5p:2x2x1")             # 4 abstract v5p chips
    mesh = tpu_topology.make_mesh({"fsdp": 4}, devices)      # placed on the torus as jax.make_mesh does
    devices = tpu_topology.devices("v5e:16x16", num_slices=2) # multislice: the data axis goes over DCN

Topology names are libtpu's: a chip generation and the slice's chip grid (`v4:2x2x1`, `v5e:4x4`, `v5p:4x4x8`,
`v6e:8x8`). A mesh axis must be made of whole physical axes of the torus; one that is not is refused with the meshes
that fit.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Sequence
from typing import Any

from vllama_jax.sharding import MESH_AXES, mesh_sizes

INSTALL_HINT = "pip install -e '.[tpu]' (brings libtpu, the TPU compiler; no TPU is needed to compile)"


def libtpu_version() -> str | None:
    """The installed libtpu's version, or None when it is not installed."""
    if importlib.util.find_spec("libtpu") is None:
        return None
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return "unknown"


def devices(topology: str, num_slices: int = 1) -> list[Any]:
    """Compile-only devices of `num_slices` slices of `topology` (e.g. 'v5p:2x2x1'), in libtpu's order."""
    if libtpu_version() is None:
        raise RuntimeError(f"--topology {topology} needs libtpu, which is not installed: {INSTALL_HINT}")
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    # No TPU VM here: do not ask the metadata server for one (it would wait for its time-outs), and let several
    # processes load libtpu at once (its lock file guards real chips; compile-only devices have none to share).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        found = topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=num_slices)
    except Exception as error:  # libtpu raises several kinds for a name it does not know
        raise ValueError(
            f"topology {topology!r} was refused by libtpu: {str(error).splitlines()[0]}. Names are a chip "
            "generation and its chip grid, e.g. v4:2x2x1, v5e:4x4, v5p:4x4x8, v6e:8x8"
        ) from error
    return list(found.devices)


def torus(devices: Sequence[Any]) -> tuple[int, ...]:
    """The chip grid of one slice of `devices` (from the devices' coordinates)."""
    first_slice = [d for d in devices if getattr(d, "slice_index", 0) in (0, None)]
    return tuple(max(d.coords[i] for d in first_slice) + 1 for i in range(len(first_slice[0].coords)))


def _fits(sizes: Sequence[int], devices: Sequence[Any]) -> bool:
    from jax.experimental import mesh_utils

    try:
        mesh_utils.create_device_mesh(list(sizes), list(devices))
    except (NotImplementedError, ValueError, AssertionError):
        return False
    return True


def fitting_meshes(devices: Sequence[Any]) -> list[dict[str, int]]:
    """Every (data, fsdp, tensor) mesh over `devices` (one slice) that the torus can hold."""
    n = len(devices)
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    out = []
    for data, tensor in itertools.product(divisors, divisors):
        if n % (data * tensor) == 0 and _fits((data, n // (data * tensor), tensor), devices):
            out.append(dict(zip(MESH_AXES, (data, n // (data * tensor), tensor))))
    return out


def make_mesh(shape: dict[str, int], devices: Sequence[Any], num_slices: int = 1):
    """A (data, fsdp, tensor) mesh over a topology's devices. With several slices the data axis spans them (the
    slow DCN link carries only the data-parallel gradient reduction): data = num_slices × the data axis inside each
    slice. A mesh the torus cannot hold is refused with the meshes that fit."""
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    sizes = mesh_sizes(shape, len(devices))
    per_slice = [d for d in devices if getattr(d, "slice_index", 0) in (0, None)]
    if sizes[0] % num_slices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} over {num_slices} slices: the data axis spans the slices, so it "
            f"must be a multiple of {num_slices}"
        )
    inner = (sizes[0] // num_slices, *sizes[1:])
    try:
        if num_slices == 1:
            grid = mesh_utils.create_device_mesh(list(inner), list(devices))
        else:
            grid = mesh_utils.create_hybrid_device_mesh(list(inner), [num_slices, 1, 1], list(devices))
    except (NotImplementedError, ValueError, AssertionError) as error:
        fits = fitting_meshes(per_slice)
        same_tensor = [m for m in fits if m["tensor"] == inner[2]] or fits
        listing = "; ".join(",".join(f"{k}={v}" for k, v in m.items()) for m in same_tensor)
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, inner))} does not fit the {'x'.join(map(str, torus(per_slice)))} torus of "
            f"{len(per_slice)} chips per slice: each mesh axis must be a product of whole physical axes. Meshes "
            f"that fit one slice: {listing}"
            + (" (the data axis is then multiplied by the number of slices)" if num_slices > 1 else "")
        ) from error
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
