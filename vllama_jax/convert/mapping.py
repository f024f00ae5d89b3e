"""The mechanics of moving weights between a PyTorch state dict (original key names) and our parameter tree.

A mapping is a list of `Rule`s, plain data: one original key, one parameter path (or several, for a packed
tensor), and how the array changes layout (the name of a `Transform` row in `TRANSFORMS`, or of a packed q/k/v
split in `SPLITS`). Component modules (`eva_vit.py`, `qformer.py`, `llama.py`) build their lists from per-layer
tables; `video_llama.py` composes them under the original prefixes.

Conversion always goes through the unscanned layout (`blocks_0`, `blocks_1`, …); `stack_numbered` /
`unstack_numbered` move between that and a scanned layout (one `blocks` subtree with a leading layer axis).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np


def _c_order(array: np.ndarray) -> np.ndarray:
    return np.require(array, requirements="C")  # ascontiguousarray would turn a 0-d buffer into (1,)


@dataclasses.dataclass(frozen=True)
class Transform:
    """How one array changes layout between PyTorch and us; exact (transposes and reshapes only).

    torch_shape(ours) is the exact PyTorch shape a tensor must have to become a parameter of shape `ours` (so a
    transposed or reordered tensor with the right element count is refused, not scrambled); to_ours(array, ours)
    returns a C-ordered array of shape `ours`; to_torch(array) is its inverse.
    """

    name: str
    layout: str  # torch <-> ours, for the reader
    torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


# One row per transform: adding one is adding a row.
TRANSFORMS: dict[str, Transform] = {t.name: t for t in (
    Transform(
        "same", "identical shape (tokens, norms, embeddings)",
        torch_shape=tuple,
        to_ours=lambda array, ours: _c_order(array.reshape(ours)),
        to_torch=lambda array: array),
    Transform(
        "bias", "(H*D,) <-> (H, D), or any reshape of a 1-D vector",
        torch_shape=lambda ours: (math.prod(ours),),
        to_ours=lambda array, ours: _c_order(array.reshape(ours)),
        to_torch=lambda array: array.reshape(-1)),
    Transform(
        "linear", "torch (out, in) <-> ours (in, *out_dims): transpose, then reshape the output dims",
        torch_shape=lambda ours: (math.prod(ours[1:]), ours[0]),
        to_ours=lambda array, ours: _c_order(array.T.reshape(ours)),
        to_torch=lambda array: np.ascontiguousarray(array.reshape(array.shape[0], -1).T)),
    Transform(
        "linear2", "torch (out, H*D) <-> ours (H, D, out): transpose, then reshape the two input dims",
        torch_shape=lambda ours: (math.prod(ours[2:]), ours[0] * ours[1]),
        to_ours=lambda array, ours: _c_order(array.T.reshape(ours)),
        to_torch=lambda array: np.ascontiguousarray(array.reshape(array.shape[0] * array.shape[1], -1).T)),
    Transform(
        "conv", "torch (O, I, *kernel) <-> ours (*kernel, I, O), 2-D or 3-D kernels",
        torch_shape=lambda ours: (ours[-1], ours[-2], *ours[:-2]),
        to_ours=lambda array, ours: _c_order(np.moveaxis(array, (0, 1), (-1, -2)).reshape(ours)),
        to_torch=lambda array: np.ascontiguousarray(np.moveaxis(array, (-1, -2), (0, 1)))),
)}

# Packed q/k/v: torch holds the three projections stacked on axis 0; each third is one target under this transform.
#   split3       torch (3*out, in) <-> three `linear` targets
#   split3_bias  torch (3*out,) <-> three `bias` targets
SPLITS = {"split3": "linear", "split3_bias": "bias"}


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str
    target: str | tuple[str, ...]
    transform: str = "same"

    def __post_init__(self):
        if self.transform not in TRANSFORMS and self.transform not in SPLITS:
            raise ValueError(f"unknown transform {self.transform!r} for {self.source}")
        if (self.transform in SPLITS) != isinstance(self.target, tuple):
            raise ValueError(f"{self.source}: only {'/'.join(SPLITS)} take several targets")

    @property
    def targets(self) -> tuple[str, ...]:
        return self.target if isinstance(self.target, tuple) else (self.target,)


def expand_layers(table: Iterable[tuple[str, Any, str]], source: str, target: str) -> list[Rule]:
    """Rules for one layer: `source`/`target` are the layer's key prefix and parameter path prefix."""
    out = []
    for src, tgt, transform in table:
        tgt_full = tuple(f"{target}/{t}" for t in tgt) if isinstance(tgt, tuple) else f"{target}/{tgt}"
        out.append(Rule(f"{source}.{src}", tgt_full, transform))
    return out


def prefixed(rules: Iterable[Rule], source_prefix: str, target_prefix: str) -> list[Rule]:
    """The same rules under a key prefix (e.g. 'visual_encoder.') and a parameter subtree (e.g. 'visual_encoder')."""
    def tgt(t):
        return f"{target_prefix}/{t}" if target_prefix else t

    return [
        Rule(source_prefix + r.source, tuple(map(tgt, r.target)) if isinstance(r.target, tuple) else tgt(r.target),
             r.transform)
        for r in rules
    ]


def torch_shape(transform: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The exact PyTorch shape a tensor must have to become a parameter of shape `ours` under `transform`."""
    return TRANSFORMS[transform].torch_shape(tuple(ours))


class ConversionError(ValueError):
    """A state dict does not match the model: names the keys and shapes involved."""


def torch_to_flat_params(
    state_dict: Mapping[str, Any],
    rules: list[Rule],
    target_shapes: Mapping[str, tuple[int, ...]],
    *,
    source_name: str = "state dict",
    ignore: Iterable[str] = (),
) -> dict[str, np.ndarray]:
    """Map an original-layout state dict to flat {param path: array}, checking every key and shape.

    Every key of `state_dict` must be used by a rule or match a regex in `ignore` (keys dropped on purpose);
    every rule's key must be present; every produced array must have the shape in `target_shapes`. All
    problems are collected and raised together, before anything is returned.
    """
    ignore_res = [re.compile(p) for p in ignore]
    problems: list[str] = []
    used = set()
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        if rule.source not in state_dict:
            problems.append(f"missing key {rule.source!r} (for {', '.join(rule.targets)})")
            continue
        used.add(rule.source)
        array = to_numpy(state_dict[rule.source])
        if rule.transform in SPLITS:
            if array.shape[0] % 3:
                problems.append(f"{rule.source}: packed q/k/v of shape {array.shape} is not divisible by 3")
                continue
            piece = SPLITS[rule.transform]
            pieces = [(t, part, piece) for t, part in zip(rule.targets, np.split(array, 3, axis=0))]
        else:
            pieces = [(rule.target, array, rule.transform)]
        for target, part, transform in pieces:
            if target not in target_shapes:
                problems.append(f"{rule.source}: the model has no parameter {target!r}")
                continue
            want = tuple(target_shapes[target])
            expected = TRANSFORMS[transform].torch_shape(want)
            if tuple(part.shape) != expected:
                problems.append(f"{rule.source}: shape {tuple(part.shape)}, expected {expected} (for {target} {want})")
                continue
            out[target] = TRANSFORMS[transform].to_ours(part, want)
    unused = [k for k in state_dict if k not in used and not any(r.fullmatch(k) for r in ignore_res)]
    if unused:
        problems.append(f"{len(unused)} unexpected keys: {', '.join(sorted(unused)[:20])}")
    not_filled = sorted(set(target_shapes) - set(out))
    if not_filled and not problems:
        problems.append(f"{len(not_filled)} parameters got no value: {', '.join(not_filled[:20])}")
    if problems:
        raise ConversionError(f"{source_name}: " + "; ".join(problems))
    return out


def flat_params_to_torch(flat_params: Mapping[str, Any], rules: list[Rule]) -> dict[str, np.ndarray]:
    """The inverse of `torch_to_flat_params`: {original key: array in PyTorch layout}."""
    out = {}
    for rule in rules:
        missing = [t for t in rule.targets if t not in flat_params]
        if missing:
            raise ConversionError(f"no parameter {missing[0]!r} for key {rule.source!r}")
        if rule.transform in SPLITS:
            piece = TRANSFORMS[SPLITS[rule.transform]]
            out[rule.source] = np.concatenate([piece.to_torch(np.asarray(flat_params[t])) for t in rule.targets])
        else:
            out[rule.source] = TRANSFORMS[rule.transform].to_torch(np.asarray(flat_params[rule.target]))
    return out


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any dtype, bfloat16 included) or array-like -> numpy, without changing the values."""
    if hasattr(value, "detach"):  # torch.Tensor, imported lazily so torch stays optional
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import ml_dtypes

            return value.view(dtype=__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


# ---- nested <-> flat, scanned <-> unscanned ----

def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def stack_numbered(flat: Mapping[str, Any], path: str, count: int) -> dict[str, Any]:
    """`{path}_0/…` … `{path}_{count-1}/…` -> `{path}/…` with a new leading axis (the scanned layout)."""
    out = {k: v for k, v in flat.items() if not k.startswith(f"{path}_")}
    suffixes = sorted({k[len(f"{path}_0/"):] for k in flat if k.startswith(f"{path}_0/")})
    for suffix in suffixes:
        out[f"{path}/{suffix}"] = np.stack([np.asarray(flat[f"{path}_{i}/{suffix}"]) for i in range(count)])
    return out


def unstack_numbered(flat: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The inverse of `stack_numbered`."""
    out = {k: v for k, v in flat.items() if not k.startswith(f"{path}/")}
    for key, value in flat.items():
        if key.startswith(f"{path}/"):
            suffix = key[len(path) + 1:]
            for i, layer in enumerate(np.asarray(value)):
                out[f"{path}_{i}/{suffix}"] = layer
    return out
