"""Sharding, declared once: logical axis names (used by the models) -> mesh axes (`data`, `fsdp`, `tensor`).

Models only name axes. This file holds the default rules table; a config may replace it
(`config.logical_axis_rules`). Changing the parallelism means editing the table, never a model.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or axes or None). The first rule naming a logical axis wins.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations: batch over data-parallel and FSDP replicas
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    # weights: FSDP shards the model width, tensor parallelism the heads / MLP / vocabulary
    ("embed", "fsdp"),
    ("encoder_embed", "fsdp"),
    ("qformer_embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
)


def make_mesh(shape: dict[str, int] | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), one entry may be -1 to take the remaining devices.

    Built by `jax.make_mesh`, which orders the devices by the accelerators' topology (a TPU slice's torus, GPU
    ids) rather than by their list order. Its axes are Auto, not jax.make_mesh's default Explicit: shardings come
    from the rules table and the jitted step's explicit in/out shardings, not from array types."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_sizes(shape, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_sizes(shape: dict[str, int] | Sequence[int], num_devices: int) -> list[int]:
    """The (data, fsdp, tensor) sizes of `shape` over `num_devices` devices: unnamed axes are 1, one axis may be
    -1 (the rest of the devices); the sizes must multiply to the device count."""
    if isinstance(shape, dict):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh {shape}: unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
        sizes = [shape.get(a, 1) for a in MESH_AXES]
    else:
        sizes = list(shape)
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh shape needs {len(MESH_AXES)} sizes for {MESH_AXES}, got {sizes}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
    return sizes


def logical_specs(boxed_tree: Any) -> Any:
    """Tree of logical PartitionSpecs (names, not mesh axes) from boxed (`LogicallyPartitioned`) parameters."""
    return nn.get_partition_spec(boxed_tree)


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def unboxed(tree: Any) -> Any:
    """The values of a boxed tree without nn.unbox's sharding constraints (which need concrete arrays under a
    mesh): works on abstract trees."""
    return jax.tree_util.tree_map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves (arrays or abstract) carrying the matching `shardings`: what an AOT
    compile or a sharded restore reads."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def mesh_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a boxed (abstract or concrete) parameter tree under `rules`.

    A dimension whose size the mesh axes do not divide is replicated instead (tiny test configs, odd vocabularies)
    so every config runs on every mesh; at full size the default rules divide evenly.
    """
    shapes = jax.tree_util.tree_map(lambda x: x.shape, unboxed(boxed_tree))  # unboxed: no constraints applied
    return logical_shardings(logical_specs(boxed_tree), shapes, mesh, rules)


def logical_shardings(specs: Any, shapes: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs and a matching tree of shapes (see mesh_shardings)."""
    specs = nn.logical_to_mesh(specs, rules)

    def fit(spec, shape):
        axes = []
        for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
            names = (axis,) if isinstance(axis, str) else (axis or ())
            size = math.prod(mesh.shape[n] for n in names)
            axes.append(axis if size > 1 and dim % size == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*axes))

    return jax.tree_util.tree_map(fit, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def cache_shardings(cache: Any, axes: dict[str, tuple[str, ...]], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a KV cache tree (arrays or ShapeDtypeStructs) whose variables' logical axes `axes` names
    by variable name (`models.llama.CACHE_AXES`); a leaf with one more dimension (a scanned decoder's) leads with
    `layers`."""
    def spec(path, leaf):
        names = axes[path[-1].key]
        return PartitionSpec(*(("layers",) if len(leaf.shape) > len(names) else ()), *names)

    specs = jax.tree_util.tree_map_with_path(spec, cache)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, cache)
    return logical_shardings(specs, shapes, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding for a batch-leading input array: dimension 0 over `activation_batch`'s mesh axes."""
    (spec,) = nn.logical_to_mesh([PartitionSpec("activation_batch", *([None] * (ndim - 1)))], rules)
    return NamedSharding(mesh, spec)
