"""The README's TPU planning and tuning tables, regenerated with the TPU compiler (`vllama-plan --topology`).

    python -m vllama_jax.bench.tpu_tables --out runs/tpu_tables [--only plan|tuning] [--rows 7b-v5p-4,...]

Each row is one `vllama-plan` command, run in its own process and kept as `<out>/<row>.json`: a rerun skips the
rows already there, so the tables can be filled over several sittings (a 7B compile takes a minute or more of
CPU). The Markdown printed at the end names each row's command and the libtpu version. Nothing is allocated.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from vllama_jax import accelerators

_7B = "configs/video_llama.py:llm=llama2_7b_chat"
_13B = "configs/video_llama.py:llm=llama2_13b_chat"
_7B_STAGE2 = "configs/video_llama.py:llm=llama2_7b_chat,recipe=vision_stage2"
# stage 2's text: the Video-ChatGPT-style instruction prompts reach 512 tokens with the 32 soft tokens
STAGE2_TEXT = 512

# (row name, config, topology, mesh, extra flags): the planning table, stage 1, one example per replica. A v5e
# 16x16 slice holds only axes of 1, 16 or 256 chips (its torus is 16 x 16: tensor=4 is refused).
PLAN_ROWS = (
    ("7b-v5e-4-fsdp", _7B, "v5e:2x2", "fsdp=4", ()),
    ("7b-v5e-16-fsdp", _7B, "v5e:4x4", "fsdp=16", ()),
    ("7b-v5e-16-fsdp-tp", _7B, "v5e:4x4", "fsdp=4,tensor=4", ()),
    ("7b-v5e-256-fsdp", _7B, "v5e:16x16", "fsdp=256", ()),
    ("7b-v5e-256-fsdp-tp", _7B, "v5e:16x16", "fsdp=16,tensor=16", ()),
    ("7b-v5p-4-fsdp", _7B, "v5p:2x2x1", "fsdp=4", ()),
    ("7b-v5p-64-fsdp", _7B, "v5p:4x4x4", "fsdp=64", ()),
    ("7b-v5p-64-fsdp-tp", _7B, "v5p:4x4x4", "fsdp=16,tensor=4", ()),
    ("7b-v5p-256-fsdp", _7B, "v5p:4x8x8", "fsdp=256", ()),
    ("13b-v5e-16-fsdp", _13B, "v5e:4x4", "fsdp=16", ()),
    ("13b-v5e-256-fsdp-tp", _13B, "v5e:16x16", "fsdp=16,tensor=16", ()),
    ("13b-v5p-4-fsdp", _13B, "v5p:2x2x1", "fsdp=4", ()),
    ("13b-v5p-128-fsdp-tp", _13B, "v5p:4x4x8", "fsdp=32,tensor=4", ()),
    ("13b-v5p-256-fsdp", _13B, "v5p:4x8x8", "fsdp=256", ()),
    ("7b-v5e-256x2-multislice", _7B, "v5e:16x16", "data=2,fsdp=256", ("--num_slices=2",)),
)

# The tuning table: LLaMA-2-7B stage 2 (the longest text) on v5p:2x2x1, one remat / scan / sharding change a row
# against the configs' defaults (fsdp=4; LLM remat dots_no_batch, ViT remat none, every tower scanned). `data=4`
# replicates every weight (the frozen towers are 99.7 % of them; the trainable glue is 22 M parameters).
TUNING_ROWS = tuple(
    (name, _7B_STAGE2, "v5p:2x2x1", mesh, (f"--text_length={STAGE2_TEXT}", *extra))
    for name, mesh, extra in (
        ("tune-llm-remat-dots_no_batch", "fsdp=4", ()),
        ("tune-llm-remat-none", "fsdp=4", ("--config.model.llm.remat_policy=none",)),
        ("tune-llm-remat-dots", "fsdp=4", ("--config.model.llm.remat_policy=dots",)),
        ("tune-llm-remat-full", "fsdp=4", ("--config.model.llm.remat_policy=full",)),
        ("tune-llm-unscanned", "fsdp=4", ("--config.model.llm.scan_layers=False",)),
        ("tune-vit-remat-full", "fsdp=4", ("--config.model.vision.remat_policy=full",)),
        ("tune-replicated", "data=4", ()),
    )
)

# The order rows are compiled in when both tables run: one row of each kind first, so that a partial run still
# says something about every question.
RUN_FIRST = (
    "7b-v5e-4-fsdp", "7b-v5p-4-fsdp", "tune-llm-remat-full", "tune-llm-remat-none", "tune-llm-remat-dots_no_batch",
    "7b-v5e-16-fsdp-tp", "13b-v5p-128-fsdp-tp", "tune-replicated", "7b-v5e-256x2-multislice", "tune-llm-remat-dots",
    "7b-v5p-64-fsdp", "13b-v5e-256-fsdp-tp", "tune-llm-unscanned", "tune-vit-remat-full",
)

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "runs/tpu_tables", "folder of the rows' JSON files")
flags.DEFINE_enum("only", None, ["plan", "tuning"], "one table")
flags.DEFINE_list("rows", [], "only these rows (by name)")
flags.DEFINE_bool("flops", False, "also count FLOPs (a few shallow compiles more per row)")
flags.DEFINE_bool("render_only", False, "print the tables from the JSON files already there")


def command(row, out: Path, flops: bool) -> list[str]:
    """The row's `vllama-plan` command; the tuning rows always count FLOPs and the compiler's time estimate (what
    a remat policy trades memory for)."""
    name, config, topology, mesh, extra = row
    flops = flops or name.startswith("tune-")
    return [
        "vllama-plan",
        f"--config={config}",
        f"--topology={topology}",
        f"--mesh={mesh}",
        *extra,
        "--flops" if flops else "--noflops",
        f"--json={out / (name + '.json')}",
    ]


def shown(row, flops: bool) -> str:
    """The command as a user types it (no output path)."""
    return " ".join(c for c in command(row, Path("."), flops) if not c.startswith("--json"))


def run_rows(rows, out: Path, flops: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        target = out / f"{row[0]}.json"
        if target.exists():
            continue
        started = time.perf_counter()
        done = subprocess.run(command(row, out, flops), capture_output=True, text=True, env=os.environ.copy())
        seconds = time.perf_counter() - started
        # the compiler's warnings (e.g. an involuntary rematerialisation) are kept beside each row, less libtpu's
        # start-up noise about TPU hosts it does not need to compile
        noise = ("hostname", "Source Location", "libtpu_init_utils", "TPU accelerator type", "InitGoogle")
        (out / f"{row[0]}.stderr.txt").write_text(
            "\n".join(line for line in done.stderr.splitlines() if line and not any(n in line for n in noise))
        )
        if done.returncode:
            print(f"{row[0]}: failed after {seconds:.0f} s (see {row[0]}.stderr.txt)", flush=True)
        else:
            print(f"{row[0]}: {seconds:.0f} s", flush=True)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def render(rows, out: Path, flops: bool, title: str) -> list[str]:
    header = (
        "| row | chips | mesh | peak GiB/chip (XLA:TPU) | arguments | temporaries | fits HBM | "
        "est. step ms (XLA:TPU cost model) | TFLOP/chip | command |"
    )
    lines = [f"#### {title}", "", header, "|---|---|---|---|---|---|---|---|---|---|"]
    libtpu = set()
    for row in rows:
        path = out / f"{row[0]}.json"
        if not path.exists():
            lines.append(f"| {row[0]} | | | not run | | | | | | `{shown(row, flops)}` |")
            continue
        result = json.loads(path.read_text())[0]
        memory = result["memory"]
        peak = memory.get("compiler_peak_bytes", memory["peak_bytes"])
        chip = accelerators.by_device_kind(result["device_kind"])
        fits = f"{peak / chip.hbm_bytes:.0%} of {chip.name}" if chip else "?"
        libtpu.add(result.get("compiler", ""))
        mesh = ",".join(f"{k}={v}" for k, v in result["mesh"].items() if v > 1)
        estimate = f"{result['estimated_step_seconds'] * 1e3:,.0f}" if "estimated_step_seconds" in result else ""
        tflop = f"{result['flops_per_device'] / 1e12:.2f}" if "flops_per_device" in result else ""
        slices = f" × {result['num_slices']} slices" if result.get("num_slices", 1) > 1 else ""
        lines.append(
            f"| {row[0]} | {result['topology']}{slices} ({result['devices']}) | {mesh} | **{_gib(peak)}** | "
            f"{_gib(memory['argument_bytes'])} | {_gib(memory['temp_bytes'])} | {fits} | {estimate} | {tflop} | "
            f"`{shown(row, flops)}` |"
        )
    lines += ["", f"Compiler: {', '.join(sorted(libtpu - {''})) or 'none run'}.", ""]
    return lines


def main(argv):
    del argv
    out = Path(FLAGS.out)
    tables = {"plan": (PLAN_ROWS, "Planning, stage 1, one example per replica"),
              "tuning": (TUNING_ROWS, f"Tuning, LLaMA-2-7B stage 2 ({STAGE2_TEXT} tokens) on v5p:2x2x1, fsdp=4")}
    chosen = {k: v for k, v in tables.items() if FLAGS.only in (None, k)}
    rows = [r for rows, _ in chosen.values() for r in rows if not FLAGS.rows or r[0] in FLAGS.rows]
    rows.sort(key=lambda r: RUN_FIRST.index(r[0]) if r[0] in RUN_FIRST else len(RUN_FIRST))
    if not FLAGS.render_only:
        run_rows(rows, out, FLAGS.flops)
    for rows, title in chosen.values():
        print("\n".join(render(rows, out, FLAGS.flops, title)))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(app.run(main))
