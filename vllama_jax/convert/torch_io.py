"""PyTorch files -> one orbax parameter checkpoint, and back, with strict key accounting.

Import plans everything from the files' headers first (which file each parameter comes from, shapes, dtypes,
unknown keys) and refuses with every problem named before anything is written. It then writes the checkpoint
one output array at a time: orbax is handed lazy leaves (`LazyArray`) that are materialised, written and
released in turn, so peak memory is one output array (for a scanned LLaMA, one stacked weight) plus the source
tensors it is built from (memory-mapped). The checkpoint is written under a temporary name by orbax and only
renamed into place when complete; every writer here removes its partial output when anything fails, then
re-raises.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import itertools
import json
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import type_handlers

from vllama_jax.convert import sources as src
from vllama_jax.convert.mapping import SPLITS, TRANSFORMS, ConversionError, Rule, flat_params_to_torch, unflatten


class LazyArray:
    """A checkpoint leaf whose values are computed when orbax writes it."""

    def __init__(self, shape, dtype, make: Callable[[], np.ndarray], name: str = ""):
        self.shape, self.dtype, self._make, self.name = tuple(shape), np.dtype(dtype), make, name
        self.on_written: Callable[[LazyArray], None] = lambda leaf: None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def load(self) -> np.ndarray:
        return self._make()


class _OneAtATimeHandler(type_handlers.NumpyHandler):
    """Writes LazyArray leaves as numpy arrays (same on-disk format, restored as usual), one after another."""

    async def _background_serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        for value, info, arg in zip(values, infos, args):
            array = value.load()
            await super()._background_serialize([array], [info], [arg])
            del array
            value.on_written(value)


def _lazy_checkpointer() -> ocp.Checkpointer:
    """A checkpointer that writes LazyArray leaves one at a time. Its type-handler registry is its own (orbax's
    standard handlers plus ours), so nothing is registered globally and restoring reads the arrays as numpy."""
    standard = [(ty, type_handlers.get_type_handler(ty)) for ty in type_handlers.supported_types()]
    registry = type_handlers.create_type_handler_registry(*standard, (LazyArray, _OneAtATimeHandler()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


@dataclasses.dataclass(frozen=True)
class Piece:
    """Where one unscanned parameter comes from: a source key, a transform, and for packed q/k/v which third."""

    key: str
    transform: str
    third: int | None = None


def target_index(rules: Iterable[Rule]) -> dict[str, Piece]:
    out = {}
    for rule in rules:
        if rule.transform in SPLITS:
            for j, target in enumerate(rule.targets):
                out[target] = Piece(rule.source, SPLITS[rule.transform], j)
        else:
            out[rule.target] = Piece(rule.source, rule.transform)
    return out


# A source tensor fills a parameter only if both are of one kind: an integer or bool tensor holds no float weights.
DTYPE_KINDS = (("floating", jnp.floating), ("complex", jnp.complexfloating), ("integer", jnp.integer),
               ("bool", jnp.bool_))


def dtype_kind(dtype) -> str:
    """'floating' (bfloat16 included), 'complex', 'integer' (signed or not) or 'bool'."""
    return next((name for name, kind in DTYPE_KINDS if jnp.issubdtype(dtype, kind)), np.dtype(dtype).name)


def _mismatch(piece: Piece, tensor: src.Tensor, target: str, param: jax.ShapeDtypeStruct) -> str | None:
    """Why `tensor` cannot fill the parameter `target` (its shape, or its dtype's kind), or None if it can."""
    expected = TRANSFORMS[piece.transform].torch_shape(tuple(param.shape))
    if piece.third is not None:
        expected = (expected[0] * 3, *expected[1:])
    if tensor.shape != expected:
        return f"{piece.key} in {tensor.source}: shape {tensor.shape}, expected {expected} (for {target} {param.shape})"
    if dtype_kind(tensor.dtype) != dtype_kind(param.dtype):
        return (f"{piece.key} in {tensor.source}: dtype {tensor.dtype.name}, but {target} is a "
                f"{dtype_kind(param.dtype)} parameter ({np.dtype(param.dtype).name})")
    return None


def _cast_mismatch(dtype, params: Iterable[jax.ShapeDtypeStruct]) -> str | None:
    """Why `--dtype` cannot hold the selected parameters (a kind none of them is), or None."""
    kinds = sorted({dtype_kind(p.dtype) for p in params} - {dtype_kind(dtype)})
    return f"--dtype {np.dtype(dtype).name} cannot hold {' or '.join(kinds)} parameters" if kinds else None


def _materialise(tensor: src.Tensor, piece: Piece, shape: tuple[int, ...], dtype) -> np.ndarray:
    array = tensor.load()
    if piece.third is not None:
        array = np.split(array, 3, axis=0)[piece.third]
    return TRANSFORMS[piece.transform].to_ours(array, shape).astype(dtype, copy=False)


@dataclasses.dataclass
class ImportPlan:
    leaves: dict[str, LazyArray]  # our param path (scanned layout) -> lazy output array
    origin: dict[str, str]  # our param path -> the file(s) its values come from
    dropped: dict[str, list[str]]  # file -> keys dropped on purpose
    outside_part: list[str]  # source keys that belong to parameters this output does not hold

    def tree(self) -> dict:
        return unflatten(self.leaves)


def plan_import(
    sources: list[src.Source],
    rules: list[Rule],
    params: Mapping[str, jax.ShapeDtypeStruct],
    scanned: list[tuple[str, int]],
    *,
    part: Callable[[str], bool] = lambda path: True,
    dtype=None,
    ignore: Iterable[str] = (),
) -> ImportPlan:
    """Map `sources` (later ones override earlier ones key by key) onto the parameters `part` selects.

    params: our unscanned flat parameters' shapes and dtypes ({'visual_encoder/blocks_0/…': ShapeDtypeStruct},
    `video_llama.unscanned_abstract`); scanned: (subtree, layers) pairs whose layers are stacked in the output.
    Raises ConversionError naming every problem (missing, unknown, mis-shaped keys; a tensor of another dtype kind
    than its parameter, e.g. int64 into float32).
    """
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    merged: dict[str, src.Tensor] = {}
    for source in sources:
        merged.update(source.tensors)
    index = target_index(rules)
    used_keys = {piece.key for piece in index.values()}
    problems: list[str] = []

    # keys nobody uses: dropped on purpose (by the kind of file they came from), or an error
    drop = {s.kind: src.dropped_patterns(s.kind) for s in sources}
    ignore_res = [re.compile(p) for p in ignore]
    dropped: dict[str, list[str]] = {}
    unknown = []
    for key, tensor in merged.items():
        if key in used_keys:
            continue
        kind = next(s.kind for s in sources if tensor.source in s.files)
        if any(p.fullmatch(key) for p in drop[kind] + ignore_res):
            dropped.setdefault(tensor.source, []).append(key)
        else:
            unknown.append(f"{key} (in {tensor.source})")
    if unknown:
        problems.append(f"{len(unknown)} keys no parameter uses and no list drops: {', '.join(sorted(unknown)[:20])}")

    # every selected parameter: present, right shape and dtype kind, one dtype per output array
    wanted = {t: p for t, p in index.items() if part(t)}
    outside = sorted({p.key for t, p in index.items() if not part(t) and p.key in merged})
    if dtype and (problem := _cast_mismatch(dtype, [params[t] for t in wanted if t in params])):
        problems.append(problem)
    per_target: dict[str, tuple[src.Tensor, Piece]] = {}
    for target, piece in sorted(wanted.items()):
        if target not in params:
            problems.append(f"{piece.key}: the model has no parameter {target!r}")
            continue
        tensor = merged.get(piece.key)
        if tensor is None:
            problems.append(f"missing {piece.key} (for {target})")
            continue
        problem = _mismatch(piece, tensor, target, params[target])
        if problem:
            problems.append(problem)
            continue
        per_target[target] = (tensor, piece)
    not_mapped = sorted(t for t in shapes if part(t) and t not in index)
    if not_mapped:
        problems.append(f"{len(not_mapped)} parameters no rule fills: {', '.join(not_mapped[:20])}")
    if problems:
        raise ConversionError("cannot import:\n  " + "\n  ".join(problems))

    leaves: dict[str, LazyArray] = {}
    origin: dict[str, str] = {}
    stacked: dict[str, list[tuple[int, str]]] = {}  # scanned output path -> [(layer, unscanned target)]
    for target in per_target:
        for subtree, _ in scanned:
            m = re.match(rf"{re.escape(subtree)}_(\d+)/(.*)", target)
            if m:
                stacked.setdefault(f"{subtree}/{m.group(2)}", []).append((int(m.group(1)), target))
                break
        else:
            tensor, piece = per_target[target]
            out_dtype = np.dtype(dtype) if dtype else tensor.dtype
            build = functools.partial(_materialise, tensor, piece, shapes[target], out_dtype)
            leaves[target] = LazyArray(shapes[target], out_dtype, build, target)
            origin[target] = tensor.source
    for path, layers in stacked.items():
        layers.sort()
        subtree = next(s for s, _ in scanned if path.startswith(s + "/"))
        count = dict(scanned)[subtree]
        if [i for i, _ in layers] != list(range(count)):
            problems.append(f"{path}: layers {[i for i, _ in layers]} of {count}")
            continue
        dtypes = {per_target[t][0].dtype for _, t in layers}
        if len(dtypes) > 1 and not dtype:
            problems.append(f"{path}: its layers come in several dtypes {sorted(map(str, dtypes))}; pass --dtype")
            continue
        out_dtype = np.dtype(dtype) if dtype else dtypes.pop()
        layer_shape = shapes[layers[0][1]]

        def build(layers=layers, layer_shape=layer_shape, out_dtype=out_dtype):
            out = np.empty((len(layers), *layer_shape), out_dtype)
            for i, target in layers:
                tensor, piece = per_target[target]
                out[i] = _materialise(tensor, piece, layer_shape, out_dtype)
            return out

        leaves[path] = LazyArray((count, *layer_shape), out_dtype, build, path)
        origin[path] = ", ".join(sorted({per_target[t][0].source for _, t in layers}))
    if problems:
        raise ConversionError("cannot import:\n  " + "\n  ".join(problems))
    return ImportPlan(leaves, origin, dropped, outside)


SOURCES_REPORT = ".sources.json"  # beside the checkpoint: the file each parameter came from, what was dropped


def _counter(total: int, progress: Callable[[str], None]) -> Callable[[str, tuple, np.dtype], None]:
    """report(name, shape, dtype) -> progress("  [i/total] name shape dtype"), i counting the calls from 1."""
    done = itertools.count(1)
    return lambda name, shape, dtype: progress(f"  [{next(done)}/{total}] {name} {tuple(shape)} {np.dtype(dtype).name}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def removed_on_error(out: Path, *suffixes: str):
    """On any exception (Ctrl-C included): remove `out` and its siblings named `out.name + suffix…`, re-raise."""
    try:
        yield
    except BaseException:
        siblings = [p for suffix in suffixes for p in out.parent.glob(glob.escape(out.name + suffix) + "*")]
        for path in [out, *siblings]:
            _remove(path)
        raise


def write_import(plan: ImportPlan, out: str | Path, progress: Callable[[str], None] = lambda line: None) -> Path:
    """Write the planned checkpoint (orbax, one array at a time) and `<out>.sources.json` (the file each
    parameter came from, and what was dropped); refuses an existing `out`. A failure leaves neither behind
    (nor orbax's `<out>.orbax-checkpoint-tmp…`)."""
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"{out} already exists; refusing to overwrite")
    report = _counter(len(plan.leaves), progress)
    for leaf in plan.leaves.values():
        leaf.on_written = lambda leaf: report(leaf.name, leaf.shape, leaf.dtype)
    with removed_on_error(out, ocp.path.atomicity_types.TMP_DIR_SUFFIX, SOURCES_REPORT):
        with _lazy_checkpointer() as checkpointer:
            checkpointer.save(out, args=ocp.args.PyTreeSave(plan.tree()))
        sources_report = {"parameters": plan.origin, "dropped": plan.dropped, "not_in_this_part": plan.outside_part}
        out.with_name(out.name + SOURCES_REPORT).write_text(json.dumps(sources_report, indent=1) + "\n")
    return out


# ---- export ----

def export_state_dict_subset(flat_unscanned: dict[str, np.ndarray], rules: list[Rule]) -> dict[str, np.ndarray]:
    """{original key: array in PyTorch layout} for every rule whose parameters are all present."""
    present = [r for r in rules if all(t in flat_unscanned for t in r.targets)]
    return flat_params_to_torch(flat_unscanned, present)


def torch_tensor(array: np.ndarray):
    """numpy (bfloat16 included) -> a torch tensor with the same bytes."""
    import ml_dtypes
    import torch

    array = np.require(array, requirements="C")
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def torch_tensors(state_dict: dict[str, np.ndarray], report=lambda key, shape, dtype: None) -> dict:
    """{key: torch tensor with the same bytes}, `report`ing each array as it is converted."""
    out = {}
    for key, array in state_dict.items():
        out[key] = torch_tensor(array)
        report(key, array.shape, array.dtype)
    return out


def save_original(state_dict: dict[str, np.ndarray], out: str | Path,
                  progress: Callable[[str], None] = lambda line: None) -> Path:
    """`{'model': state_dict}` as the original Video-LLaMA saves and loads it; one progress line per array as it
    goes into the file's tensors, written whole as `<out>.partial` (removed on failure), then renamed."""
    import torch

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; refusing to overwrite")
    partial = out.with_name(out.name + ".partial")
    with removed_on_error(partial):
        torch.save({"model": torch_tensors(state_dict, _counter(len(state_dict), progress))}, partial)
        partial.rename(out)
    return out


def save_hf_llama(state_dict: dict[str, np.ndarray], llm_config, out: str | Path, max_shard_bytes: int = 5 * 2**30,
                  progress: Callable[[str], None] = lambda line: None) -> Path:
    """A Hugging Face Llama folder (config.json, safetensors shards, index) from `model.*` / `lm_head.*` keys,
    written as `<out>.partial` (removed on failure), then renamed; one progress line per array once its shard
    is written."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; refusing to overwrite")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a process killed outright
    with removed_on_error(partial):
        _write_hf_llama(state_dict, llm_config, partial, max_shard_bytes, _counter(len(state_dict), progress))
        partial.rename(out)
    return out


def _write_hf_llama(state_dict: dict[str, np.ndarray], llm_config, folder: Path, max_shard_bytes: int, report) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    shards, current, size = [], {}, 0
    for key in sorted(state_dict):
        nbytes = state_dict[key].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = state_dict[key]
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(torch_tensors(shard), str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        for key in shard:
            report(key, shard[key].shape, shard[key].dtype)
    total = sum(a.nbytes for a in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    dtypes = {str(a.dtype) for a in state_dict.values()}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": llm_config.vocab_size, "hidden_size": llm_config.hidden_size,
        "intermediate_size": llm_config.intermediate_size, "num_hidden_layers": llm_config.num_layers,
        "num_attention_heads": llm_config.num_heads, "num_key_value_heads": llm_config.num_kv_heads,
        "rms_norm_eps": llm_config.rms_norm_eps, "rope_theta": llm_config.rope_theta,
        "max_position_embeddings": getattr(llm_config, "max_position_embeddings", 4096), "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": dtypes.pop() if len(dtypes) == 1 else "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
