"""`vllama-convert`: the released PyTorch checkpoints -> an orbax parameter checkpoint, and back.

    vllama-convert import --config=configs/video_llama.py:llama2_7b_chat --part=frozen --out=ckpt/frozen \\
        --source=eva_vit_g.pth --source=blip2_pretrained_flant5xxl.pth --source=llama-2-7b-chat-hf/
    vllama-convert import --config=… --part=trainable --out=ckpt/stage1 --source=finetune-vicuna7b-v2.pth
    vllama-convert import --config=configs/video_llama.py:tiny --config.model.llm.num_layers=3 --dry_run …
    vllama-convert export --config=… --params=ckpt/frozen --params=runs/stage1 --format=video_llama --out=vl.pth
    vllama-convert export --config=… --params=ckpt/frozen --format=hf_llama --out=llama-hf/
    vllama-convert import --config=configs/video_llava.py:llm=vicuna_7b --source=Video-LLaVA-7B/ --out=ckpt/vllava
    vllama-convert export --config=configs/video_llava.py:llm=vicuna_7b --params=ckpt/vllava --format=video_llava_hf \
        --drop_temporal_attention --out=vllava-hf/

The command comes first, then absl flags (`--out=DIR` or `--out DIR`); after `--config`, any config field can be
overridden with `--config.<field>=<value>`. `vllama-convert import --help` lists a command's flags.

Import: later sources override earlier ones where they hold a key. `--part=frozen` writes what
`train.frozen_checkpoint` reads, `--part=trainable` what `train.init_trainable` reads, `all` both. Export reads
parameter checkpoints and run directories (their newest trainable weights) and writes the original
`{'model': state_dict}` (`--trainable_only` for what the original demo loads as `ckpt`) or a Hugging Face folder.
A Video-LLaVA config (`family = "video_llava"`, docs/video_llava.md) imports the original release or a
transformers folder and exports to either (`--format=video_llava|video_llava_hf`).
Errors (a refused source, a bad flag) print one `vllama-convert: …` message and exit with status 2.
"""
from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from vllama_jax.checkpoints import read_saved
from vllama_jax.config import lora_config, model_config
from vllama_jax.convert import sources as src
from vllama_jax.convert import video_llava
from vllama_jax.convert.mapping import ConversionError, flatten, unflatten, unstack_numbered
from vllama_jax.convert.torch_io import (
    export_state_dict_subset,
    plan_import,
    save_hf_llama,
    save_original,
    write_import,
)
from vllama_jax.convert.video_llama import UNUSED_KEYS, scanned_subtrees, unscanned_abstract, video_llama_rules
from vllama_jax.models import lora
from vllama_jax.models.video_llama import AUDIO_TRAINABLE, VISUAL_TRAINABLE, VideoLlama, VideoLlamaConfig, init_params
from vllama_jax.models.video_llava import VideoLlavaConfig

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
            names = {Path(f).name for k, o in origin.items() if k.split("/")[0] == name for f in o.split(", ")}
            files = "  <- " + ", ".join(sorted(names))
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


def run_import(model_cfg: VideoLlamaConfig, *, source_paths: Sequence[str], out: str, part: str = "all",
               dtype: str | None = None, dry_run: bool = False, drop_audio: bool = False) -> int:
    """Plan the import of `source_paths` (later ones win key by key) into `model_cfg`'s parameters that `part`
    selects, print what comes from where, and write it to `out` unless `dry_run`."""
    if isinstance(model_cfg, VideoLlavaConfig):
        if (part, dtype, drop_audio) != ("all", None, False):
            raise ValueError("a Video-LLaVA import takes --source, --out and --dry_run only (every parameter, in the "
                             "model's dtypes)")
        return video_llava.run_import(model_cfg, source_paths=source_paths, out=out, dry_run=dry_run)
    scanned = scanned_subtrees(model_cfg)
    params = unscanned_abstract(abstract_params(model_cfg), scanned)
    components = {k.split("/")[0] for k in params}
    if part not in ("all", "frozen", "trainable") and not set(part.split(",")) <= components:
        raise ValueError(f"--part {part}: unknown components {sorted(set(part.split(',')) - components)}; "
                         f"the model has {sorted(components)}")
    sources = []
    for path in source_paths:
        source = src.open_source(path)
        sources.append(source)
        print(f"source {path}: {source.kind}, {len(source.tensors)} tensors in {len(source.files)} file(s)", flush=True)
    ignore = list(UNUSED_KEYS) + (list(AUDIO_KEYS) if drop_audio else [])
    plan = plan_import(sources, video_llama_rules(model_cfg), params, scanned, part=part_filter(part), dtype=dtype,
                       ignore=ignore)
    for file, keys in plan.dropped.items():
        shown = ", ".join(sorted(keys)[:4]) + (", …" if len(keys) > 4 else "")
        print(f"dropped on purpose from {file}: {len(keys)} keys ({shown})")
    if plan.outside_part:
        print(f"not in part {part!r}: {len(plan.outside_part)} source keys (e.g. {plan.outside_part[0]})")
    if dry_run:
        for row in summary_table(plan.tree(), plan.origin):
            print(row)
        print("dry run: every key, shape and dtype checked; nothing written")
        return 0
    started = time.time()
    print(f"writing {len(plan.leaves)} arrays to {out} …", flush=True)
    write_import(plan, out, progress=lambda line: print(line, flush=True))
    print(f"wrote {out} in {time.time() - started:.1f} s")
    for row in summary_table(plan.tree(), plan.origin):
        print(row)
    return 0


def read_params(paths: list[str]) -> dict:
    """Merge parameter checkpoints and run directories (their newest train state's trainable weights)."""
    merged: dict = {}
    for path in paths:
        tree, what = read_saved(path)
        print(f"params {path}: {what}")
        merged.update(tree)
    return merged


VIDEO_LLAVA_FORMATS = {"video_llava": "original", "video_llava_hf": "hf"}


def run_export(model_cfg: VideoLlamaConfig | VideoLlavaConfig, *, param_paths: Sequence[str], out: str,
               out_format: str = "video_llama", trainable_only: bool = False,
               drop_temporal_attention: bool = False, adapters: lora.LoraConfig | None = None) -> int:
    """Merge `param_paths` (later ones win) and write them as the original `{'model': state_dict}` .pth
    (`out_format="video_llama"`) or a Hugging Face Llama folder of the LLM (`out_format="hf_llama"`); a
    Video-LLaVA model as the original release's folder ("video_llava") or transformers' ("video_llava_hf")."""
    is_llava = isinstance(model_cfg, VideoLlavaConfig)
    if is_llava != (out_format in VIDEO_LLAVA_FORMATS):
        family = "Video-LLaVA" if is_llava else "Video-LLaMA"
        choices = sorted(VIDEO_LLAVA_FORMATS) if is_llava else ["hf_llama", "video_llama"]
        raise ValueError(f"--format {out_format} is not a {family} format: expected one of {choices}")
    params = read_params(param_paths)
    if "lora" in params:  # a LoRA run: its adapters fold into the LLM's weights
        if adapters is None or not adapters.rank:
            raise ValueError("the params hold LoRA adapters: give the run's config (with its lora.rank and alpha)")
        params = lora.merge(params, adapters)
        print(f"merged the LoRA adapters into {adapters.subtree} (scale {adapters.scale:g})")
    if is_llava:
        return video_llava.run_export(model_cfg, params, out=out, layout=VIDEO_LLAVA_FORMATS[out_format],
                                      drop_temporal_attention=drop_temporal_attention)
    if trainable_only:
        params = {k: v for k, v in params.items() if k in TRAINABLE_NAMES}
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    for subtree, _ in scanned_subtrees(model_cfg):
        if any(k.startswith(subtree + "/") for k in flat):
            flat = unstack_numbered(flat, subtree)
    rules = video_llama_rules(model_cfg)
    if out_format == "hf_llama":
        rules = [r for r in rules if r.source.startswith("llama_model.")]
        state = {k.removeprefix("llama_model."): v for k, v in export_state_dict_subset(flat, rules).items()}
        if len(state) != len(rules):
            raise ConversionError(f"the params hold {len(state)} of the LLM's {len(rules)} tensors")
        write = functools.partial(save_hf_llama, state, model_cfg.llm, out)
    else:
        state = export_state_dict_subset(flat, rules)
        write = functools.partial(save_original, state, out)
    print(f"writing {len(state)} tensors to {out} …", flush=True)
    write(progress=lambda line: print(line, flush=True))
    print(f"wrote {out}: {len(state)} tensors")
    for row in summary_table(unflatten({k.replace(".", "/", 1) if "." in k else k: v for k, v in state.items()})):
        print(row)
    return 0


# ---- the command line ----

def _import_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_multi_string("source", None, "a .pth / .safetensors file or a Hugging Face Llama folder; later "
                              "sources win key by key", flag_values=fv)
    flags.DEFINE_string("out", None, "the orbax directory to write, which must not exist", flag_values=fv)
    flags.DEFINE_string("part", "all", "all | frozen | trainable | top-level names, comma-separated "
                        "(e.g. llama_model)", flag_values=fv)
    flags.DEFINE_string("dtype", None, "cast every array (e.g. bfloat16); default: keep each source's dtype",
                        flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "check every key, shape and dtype and print the table; write nothing",
                      flag_values=fv)
    flags.DEFINE_bool("drop_audio", False, "drop audio-branch keys (audio_*) instead of refusing them, for a "
                      "config without the audio branch", flag_values=fv)


def _export_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_multi_string("params", None, "a parameter checkpoint or a vllama-train run directory; later "
                              "ones win", flag_values=fv)
    flags.DEFINE_enum("format", "video_llama", ["video_llama", "hf_llama", "video_llava", "video_llava_hf"],
                      "the original {'model': state_dict} .pth, or a Hugging Face Llama folder of the LLM; for "
                      "Video-LLaVA: the original release's folder, or transformers' (video_llava_hf)", flag_values=fv)
    flags.DEFINE_string("out", None, "the file (video_llama) or folder (hf_llama) to write, which must not exist",
                        flag_values=fv)
    flags.DEFINE_bool("trainable_only", False, "only the trainable subtrees (what the original demo loads as "
                      "`ckpt`)", flag_values=fv)
    flags.DEFINE_bool("drop_temporal_attention", False, "video_llava_hf: drop the video tower's temporal layers, "
                      "which transformers has no place for (refused without this flag)", flag_values=fv)


def flag_model_config(fv: flags.FlagValues) -> VideoLlamaConfig | VideoLlavaConfig:
    """The model config that `--config` and its overrides describe. config_flags keeps a file that failed to
    load until its first use: that failure is reported here, as a missing file."""
    try:
        return model_config(fv.config)
    except OSError as err:
        raise FileNotFoundError(f"--config: {' '.join(str(err).split())}") from err


class Command(NamedTuple):
    summary: str
    define_flags: Callable[[flags.FlagValues], None]  # the command's flags besides --config
    required: tuple[str, ...]
    run: Callable[[flags.FlagValues], int]


COMMANDS = {
    "import": Command(
        "PyTorch files -> an orbax parameter checkpoint", _import_flags, ("source", "out"),
        lambda fv: run_import(flag_model_config(fv), source_paths=fv.source, out=fv.out, part=fv.part,
                              dtype=fv.dtype, dry_run=fv.dry_run, drop_audio=fv.drop_audio)),
    "export": Command(
        "orbax parameters -> the original .pth or a Hugging Face Llama folder", _export_flags, ("params", "out"),
        lambda fv: run_export(flag_model_config(fv), param_paths=fv.params, out=fv.out, out_format=fv.format,
                              trainable_only=fv.trainable_only, drop_temporal_attention=fv.drop_temporal_attention,
                              adapters=lora_config(fv.config))),
}


def command_flags(command: str, argv: Sequence[str] = ()) -> flags.FlagValues:
    """A fresh set of `command`'s flags, so that `main` can run again in the same process. config_flags reads
    `argv` (the whole command line, program name first) to define the `--config.<field>` overrides it holds."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "a config file and its argument, e.g. "
                                    "configs/video_llama.py:llama2_7b_chat", flag_values=fv, sys_argv=list(argv))
    COMMANDS[command].define_flags(fv)
    return fv


def parse_flags(command: str, argv: Sequence[str]) -> flags.FlagValues:
    """`command`'s flags parsed from `argv` (program name first). Raises flags.Error naming the problem in one
    line: an unknown or missing flag, a bad value, an override of a field the config does not have."""
    fv = command_flags(command, argv)
    try:
        extra = fv(list(argv))[1:]
    except AttributeError as err:  # config_flags: an override names no field of the config
        field = str(err).strip("\"'")
        raise flags.Error(f"a --config override names a field the config does not have ({field})") from err
    except OSError as err:  # config_flags: the config file behind an override did not load
        raise flags.Error(f"--config: {' '.join(str(err).split())}") from err
    except flags.Error as err:
        raise flags.Error(" ".join(str(err).split())) from err
    if extra:
        raise flags.Error(f"unexpected arguments {' '.join(extra)} (flags are --name=value)")
    missing = [f"--{name}" for name in ("config", *COMMANDS[command].required) if fv[name].value is None]
    if missing:
        raise flags.Error(f"{command} needs {', '.join(missing)} (see vllama-convert {command} --help)")
    return fv


def usage(command: str) -> str:
    """The command's flags, one line each: spelling, help (absl's, which names the choices and says what
    repeats), and whether it is required or has a default."""
    fv = command_flags(command)
    required = {"config", *COMMANDS[command].required}
    lines = [f"vllama-convert {command}: {COMMANDS[command].summary}"]
    for name in fv:
        flag = fv[name]
        notes = ["required"] * (name in required)
        if flag.default not in (None, False):
            notes.append(f"default {flag.default}")
        spelling = f"--{name}" if flag.boolean else f"--{name}=…"
        lines.append(f"  {spelling:26} {' '.join(flag.help.split())}" + (f" ({'; '.join(notes)})" if notes else ""))
    lines.append(f"  {'--config.<field>=<value>':26} override one field of the config (after --config)")
    return "\n".join(lines)


def _failed(message: str) -> int:
    print(f"vllama-convert: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; `argv` is the command line without the program name (default: sys.argv[1:]), e.g.
    ["import", "--config=configs/video_llama.py:tiny", "--source=branch.pth", "--out=ckpt"]. Returns the exit
    status: 0, or 2 with a `vllama-convert: …` message on stderr and nothing written (a failure while writing
    is re-raised after the partial output is removed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    helps = ("--help", "-h")
    if argv and argv[0] in helps:
        print("\n\n".join([__doc__.strip(), *map(usage, COMMANDS)]))
        return 0
    if not argv or argv[0] not in COMMANDS:
        named = f"unknown command {argv[0]!r}" if argv else "no command"
        return _failed(f"{named}: the first argument is import or export (see vllama-convert --help)")
    command, rest = argv[0], argv[1:]
    if any(arg in helps for arg in rest):
        print(usage(command))
        return 0
    try:
        fv = parse_flags(command, [f"vllama-convert {command}", *rest])
        return COMMANDS[command].run(fv)
    except (flags.Error, ConversionError, FileNotFoundError, FileExistsError, ValueError) as err:
        return _failed(str(err))


def cli():
    sys.exit(main())
