"""`vllama-convert`: the released PyTorch checkpoints -> an orbax parameter checkpoint, and back.

    vllama-convert import --config configs/video_llama.py:llama2_7b_chat --part frozen --out ckpt/frozen \\
        --source eva_vit_g.pth --source blip2_pretrained_flant5xxl.pth --source llama-2-7b-chat-hf/
    vllama-convert import --config … --part trainable --out ckpt/stage1 --source finetune-vicuna7b-v2.pth
    vllama-convert export --config … --params ckpt/frozen --params runs/stage1 --format video_llama --out vl.pth
    vllama-convert export --config … --params ckpt/frozen --format hf_llama --out llama-hf/

Import: later sources override earlier ones where they hold a key. `--part frozen` writes what
`train.frozen_checkpoint` reads, `--part trainable` what `train.init_trainable` reads, `all` both. Export reads
parameter checkpoints and run directories (their newest trainable weights) and writes the original
`{'model': state_dict}` (`--trainable-only` for what the original demo loads as `ckpt`) or a Hugging Face folder.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from vllama_jax.config import load_config, model_config
from vllama_jax.convert import sources as src
from vllama_jax.convert.torch_io import (
    export_state_dict_subset,
    plan_import,
    save_hf_llama,
    save_original,
    write_import,
)
from vllama_jax.convert.mapping import ConversionError, flatten, unflatten, unstack_numbered
from vllama_jax.convert.video_llama import UNUSED_KEYS, scanned_subtrees, unscanned_abstract, video_llama_rules
from vllama_jax.models.video_llama import AUDIO_TRAINABLE, VISUAL_TRAINABLE, VideoLlama, init_params

AUDIO_KEYS = (r"audio_.*",)
TRAINABLE_NAMES = VISUAL_TRAINABLE + AUDIO_TRAINABLE  # what the original's `ckpt` / `ckpt_2` files hold


def abstract_params(model_cfg):
    """The model's parameter shapes and dtypes, without allocating them."""
    return nn.unbox(jax.eval_shape(lambda: init_params(VideoLlama(model_cfg), jax.random.PRNGKey(0))))


def summary_table(tree: dict, origin: dict[str, str] | None = None) -> list[str]:
    """One row per top-level component: parameters, bytes, dtypes (and source files)."""
    rows = [f"{'component':32} {'parameters':>15} {'MiB':>10}  dtype"]
    total_n = total_b = 0
    for name in sorted(tree):
        leaves = flatten({name: tree[name]}) if isinstance(tree[name], dict) else {name: tree[name]}
        n = sum(int(np.prod(v.shape)) for v in leaves.values())
        b = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in leaves.values())
        dtypes = ",".join(sorted({np.dtype(v.dtype).name for v in leaves.values()}))
        files = ""
        if origin:
            files = "  <- " + ", ".join(sorted({Path(f).name for k, o in origin.items() if k.split("/")[0] == name for f in o.split(", ")}))
        rows.append(f"{name:32} {n:>15,} {b / 2**20:>10.1f}  {dtypes}{files}")
        total_n, total_b = total_n + n, total_b + b
    rows.append(f"{'total':32} {total_n:>15,} {total_b / 2**20:>10.1f}")
    return rows


def part_filter(part: str):
    """all | frozen | trainable | a comma-separated list of top-level names (e.g. llama_model)."""
    trainable = lambda path: path.split("/")[0] in TRAINABLE_NAMES  # noqa: E731
    named = {"all": lambda path: True, "trainable": trainable, "frozen": lambda path: not trainable(path)}
    if part in named:
        return named[part]
    names = set(part.split(","))
    return lambda path: path.split("/")[0] in names


def run_import(args) -> int:
    config = load_config(args.config)
    model_cfg = model_config(config)
    scanned = scanned_subtrees(model_cfg)
    params = unscanned_abstract(abstract_params(model_cfg), scanned)
    components = {k.split("/")[0] for k in params}
    if args.part not in ("all", "frozen", "trainable") and not set(args.part.split(",")) <= components:
        raise ValueError(f"--part {args.part}: unknown components {sorted(set(args.part.split(',')) - components)}; "
                         f"the model has {sorted(components)}")
    sources = []
    for path in args.source:
        source = src.open_source(path)
        sources.append(source)
        print(f"source {path}: {source.kind}, {len(source.tensors)} tensors in {len(source.files)} file(s)", flush=True)
    ignore = list(UNUSED_KEYS) + (list(AUDIO_KEYS) if args.drop_audio else [])
    plan = plan_import(sources, video_llama_rules(model_cfg), params, scanned, part=part_filter(args.part),
                       dtype=args.dtype, ignore=ignore)
    for file, keys in plan.dropped.items():
        print(f"dropped on purpose from {file}: {len(keys)} keys ({', '.join(sorted(keys)[:4])}{', …' if len(keys) > 4 else ''})")
    if plan.outside_part:
        print(f"not in part {args.part!r}: {len(plan.outside_part)} source keys (e.g. {plan.outside_part[0]})")
    if args.dry_run:
        for row in summary_table(plan.tree(), plan.origin):
            print(row)
        print("dry run: every key, shape and dtype checked; nothing written")
        return 0
    started = time.time()
    print(f"writing {len(plan.leaves)} arrays to {args.out} …", flush=True)
    write_import(plan, args.out, progress=lambda line: print(line, flush=True))
    print(f"wrote {args.out} in {time.time() - started:.1f} s")
    for row in summary_table(plan.tree(), plan.origin):
        print(row)
    return 0


def read_params(paths: list[str]) -> dict:
    """Merge parameter checkpoints and run directories (their newest train state's trainable weights)."""
    import orbax.checkpoint as ocp

    merged: dict = {}
    for path in map(Path, paths):
        if (path / "checkpoints").is_dir():
            with ocp.CheckpointManager((path / "checkpoints").absolute()) as manager:
                step = manager.latest_step()
                if step is None:
                    raise FileNotFoundError(f"{path}: no complete checkpoint")
            with ocp.StandardCheckpointer() as checkpointer:
                tree = checkpointer.restore((path / "checkpoints" / str(step) / "state").absolute())["trainable"]
            print(f"params {path}: trainable weights of step {step}")
        else:
            with ocp.StandardCheckpointer() as checkpointer:
                tree = checkpointer.restore(path.absolute())
            print(f"params {path}: {', '.join(sorted(tree))}")
        merged.update(tree)
    return merged


def run_export(args) -> int:
    config = load_config(args.config)
    model_cfg = model_config(config)
    params = read_params(args.params)
    if args.trainable_only:
        params = {k: v for k, v in params.items() if k in TRAINABLE_NAMES}
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    for subtree, _ in scanned_subtrees(model_cfg):
        if any(k.startswith(subtree + "/") for k in flat):
            flat = unstack_numbered(flat, subtree)
    rules = video_llama_rules(model_cfg)
    if args.format == "hf_llama":
        rules = [r for r in rules if r.source.startswith("llama_model.")]
        state = {k.removeprefix("llama_model."): v for k, v in export_state_dict_subset(flat, rules).items()}
        if len(state) != len(rules):
            raise ConversionError(f"the params hold {len(state)} of the LLM's {len(rules)} tensors")
        write = functools.partial(save_hf_llama, state, model_cfg.llm, args.out)
    else:
        state = export_state_dict_subset(flat, rules)
        write = functools.partial(save_original, state, args.out)
    print(f"writing {len(state)} tensors to {args.out} …", flush=True)
    write(progress=lambda line: print(line, flush=True))
    print(f"wrote {args.out}: {len(state)} tensors")
    for row in summary_table(unflatten({k.replace(".", "/", 1) if "." in k else k: v for k, v in state.items()})):
        print(row)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vllama-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="PyTorch files -> orbax parameter checkpoint")
    imp.add_argument("--config", required=True, help="e.g. configs/video_llama.py:llama2_7b_chat")
    imp.add_argument("--source", action="append", required=True, help="a .pth / .safetensors file or a HF Llama folder (repeat; later wins)")
    imp.add_argument("--out", required=True, help="output orbax directory (must not exist)")
    imp.add_argument("--part", default="all", help="all | frozen | trainable | top-level names, comma-separated (e.g. llama_model)")
    imp.add_argument("--dtype", default=None, help="cast every array (e.g. bfloat16); default: keep each source's dtype")
    imp.add_argument("--dry-run", action="store_true", help="check everything and print the table; write nothing")
    imp.add_argument("--drop-audio", action="store_true", help="drop audio-branch keys (audio_*) instead of refusing them, for a config without the audio branch")
    exp = commands.add_parser("export", help="orbax parameters -> the original .pth or a HF Llama folder")
    exp.add_argument("--config", required=True)
    exp.add_argument("--params", action="append", required=True, help="a parameter checkpoint or a run directory (repeat; later wins)")
    exp.add_argument("--format", choices=("video_llama", "hf_llama"), default="video_llama")
    exp.add_argument("--out", required=True)
    exp.add_argument("--trainable-only", action="store_true", help="only the trainable subtrees (the original demo's `ckpt`)")
    args = parser.parse_args(argv)
    try:
        return run_import(args) if args.command == "import" else run_export(args)
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"vllama-convert: {err}", file=sys.stderr)
        return 2


def cli():
    sys.exit(main())
