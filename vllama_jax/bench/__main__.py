"""`python -m vllama_jax.bench`: every figure side by side in one run, reported as ratios (Markdown + JSON).

    python -m vllama_jax.bench                   # the full report (about 15 minutes on 2 CPU cores)
    python -m vllama_jax.bench --quick           # smaller batch, fewer repeats: what CI runs (fails if the
                                                 # loss cross-check against PyTorch fails)
    python -m vllama_jax.bench --json=bench.json --markdown=bench.md --config.data.num_frames=4

Flags: `--quick`, `--json`, `--markdown`, and `--config` (default `configs/video_llama.py:llm=bench`, the model
timed; `--config.x=y` overrides it; the same file's `llm=tiny` and `llm=llama2_7b_chat` give the dispatch-bound
comparison and the full-size FLOP counts).

Sections: (1) the stage-1 train step against PyTorch (losses cross-checked first, then step time); (2) its
roofline: achieved FLOP/s against this machine's measured float32 matmul peak, and a per-part breakdown;
(3) the input pipeline against the full-decode baseline and against what the step consumes; (4) cached decoding
against transformers' `generate`; (5) the frozen-feature cache's step against the end-to-end step. The model
is the `bench` config (configs/video_llama.py says why its size); timings are medians, and a shared machine is
noisy, so read the ratios.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "video_llama.py"


def machine() -> dict:
    import jax
    import numpy as np
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")\
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"cpu": cpu or platform.machine(), "cores": os.cpu_count(), "platform": platform.platform(),
            "devices": f"{jax.device_count()} {jax.devices()[0].platform}",
            "versions": {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__,
                         "torch": torch.__version__, "transformers": transformers.__version__},
            "torch_threads": torch.get_num_threads()}


def run(quick: bool, config, config_path: str, log=print) -> dict:
    """The report's numbers for the `config` model; `config_path` (its file) gives the tiny and full-size configs."""
    from vllama_jax.bench import train_step
    from vllama_jax.config import load_config

    full = load_config(f"{config_path}:llm=llama2_7b_chat")
    batch, check, timed, repeats = (2, 2, 3, 3) if quick else (4, 3, 8, 5)
    report = {"machine": machine(), "quick": quick, "config": {"name": "bench", "model": config.model.to_dict(),
                                                               "batch_size": batch, "frames": config.data.num_frames}}
    started = time.perf_counter()

    log("[1/5] train step: ours vs PyTorch (same weights, same batch)")
    report["train_step"] = train_step.compare_train_steps(config, batch, check, timed, log=log)
    log(f"  ours {report['train_step']['ours_seconds']:.3f} s, PyTorch {report['train_step']['pytorch_seconds']:.3f} s"
        f" per step: {report['train_step']['speedup']:.2f}x")
    if not quick:  # compute-bound check: twice the batch should take about twice the time
        double = train_step.compare_train_steps(config, 2 * batch, 1, max(3, timed // 2), log=log)
        report["train_step_double_batch"] = {
            k: double[k] for k in ("batch_size", "ours_seconds", "pytorch_seconds", "speedup")
        }

    # the same comparison where the step is too small to be compute-bound: what dispatch and fusion are worth
    tiny = load_config(f"{config_path}:llm=tiny")
    tiny.model.video_qformer.update(hidden_dropout=0.0, attention_dropout=0.0)  # for the loss cross-check
    small = train_step.compare_train_steps(tiny, 8, 1, 3 * timed, log=log)
    report["train_step_tiny"] = {
        k: small[k] for k in ("batch_size", "ours_seconds", "pytorch_seconds", "speedup", "step_flops")
    }

    log("[2/5] roofline: measured matmul peak, step FLOP/s, parts")
    peak = train_step.measured_peak(2048)
    ts = report["train_step"]
    report["roofline"] = {
        "peak_flops": peak,
        "step_flops": ts["step_flops"],
        "achieved_flops": ts["step_flops"] / ts["ours_seconds"],
        "fraction_of_peak": ts["step_flops"] / ts["ours_seconds"] / peak,
        "parts": train_step.step_parts(config, batch, repeats),
    }

    log("[3/5] input pipeline: seeking decoder vs full decode, against the step's appetite")
    from vllama_jax.bench import pipeline as data_bench

    with tempfile.TemporaryDirectory() as tmp:
        pipe = data_bench.run(2 if quick else 4, 6.0 if quick else 12.0, 2 if quick else 3, Path(tmp))
    consumed = batch / ts["ours_seconds"]
    report["pipeline"] = {
        **{
            k: pipe[k]
            for k in (
                "baseline_clips_per_s",
                "ours_clips_per_s",
                "ratio",
                "ratio_cpu",
                "ours_clips_per_s_cpu",
                "clip_seconds",
            )
        },
        "step_consumes_clips_per_s": consumed,
        "cores_needed_to_keep_up": consumed / pipe["ours_clips_per_s_cpu"],
    }

    log("[4/5] generation: cached decoding vs transformers' generate")
    from vllama_jax.bench import decode as decode_bench

    runs = (
        [("tiny", 1, 16, 16, 2)]
        if quick
        else [("tiny", 1, 128, 64, 3), ("small", 1, 128, 64, 3), ("small", 8, 128, 64, 3)]
    )
    report["generation"] = [decode_bench.measure(*r) for r in runs]
    if not all(r["same_tokens"] for r in report["generation"]):
        raise AssertionError("cached decoding's greedy tokens differ from transformers' generate")

    log("[5/5] frozen-feature cache: cached step vs end-to-end step")
    report["feature_cache"] = train_step.feature_cache_cost(config, full, batch, repeats, compile_full=not quick)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def markdown(r: dict) -> str:
    m, ts, rf, pipe, fc = r["machine"], r["train_step"], r["roofline"], r["pipeline"], r["feature_cache"]
    v = m["versions"]
    lines = [
        "# vllama-jax benchmark" + (" (--quick)" if r["quick"] else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['devices']} device(s); {m['platform']}. "
        f"python {v['python']}, jax {v['jax']}, numpy {v['numpy']}, torch {v['torch']} ({m['torch_threads']} threads), "
        f"transformers {v['transformers']}. Config: `bench` (configs/video_llama.py), batch {r['config']['batch_size']} "
        f"clips × {r['config']['frames']} frames at {ts['image_size']} px, {ts['text_length']} tokens. Took {r['seconds']} s.",
        "",
        "## Train step (stage 1, visual branch, float32)",
        "",
        "| | ours (jit) | PyTorch (eager) | ours / PyTorch |",
        "|---|---|---|---|",
        f"| loss over the first {len(ts['losses']['ours'])} steps | {', '.join(f'{x:.6f}' for x in ts['losses']['ours'])} "
        f"| {', '.join(f'{x:.6f}' for x in ts['losses']['pytorch'])} | max diff {ts['max_loss_diff']:.1e} (bound 1e-4) |",
        f"| seconds per step (median) | {ts['ours_seconds']:.3f} | {ts['pytorch_seconds']:.3f} | **{ts['speedup']:.2f}× faster** |",
    ]
    if "train_step_double_batch" in r:
        d = r["train_step_double_batch"]
        lines.append(
            f"| seconds per step at batch {d['batch_size']} | {d['ours_seconds']:.3f} | {d['pytorch_seconds']:.3f} "
            f"| {d['speedup']:.2f}× (ours: {d['ours_seconds'] / ts['ours_seconds']:.2f}× the time for 2× the batch) |"
        )
    t = r["train_step_tiny"]
    lines.append(
        f"| the `tiny` config (batch {t['batch_size']}, {t['step_flops'] / 1e6:.0f} MFLOP a step: dispatch-bound, "
        f"not compute-bound) | {t['ours_seconds'] * 1e3:.1f} ms | {t['pytorch_seconds'] * 1e3:.1f} ms | {t['speedup']:.2f}× |"
    )
    lines += [
        f"\nParameters: {ts['parameters']['trainable']:,} trainable, {ts['parameters']['frozen']:,} frozen; our step "
        f"{ts['step_flops'] / 1e9:.1f} GFLOP (XLA cost analysis), compiled in {ts['compile_seconds']} s.",
        "",
        "## Roofline",
        "",
        f"Peak: {rf['peak_flops'] / 1e9:.1f} GFLOP/s (one large float32 `jnp.dot`, best of 5). Step: "
        f"{rf['achieved_flops'] / 1e9:.1f} GFLOP/s = **{rf['fraction_of_peak']:.0%} of peak**.",
        "",
        "| part (jitted alone) | GFLOP | ms | GFLOP/s | of peak | share of the step's time |",
        "|---|---|---|---|---|---|",
    ]
    for p in rf["parts"]:
        lines.append(
            f"| {p['part']} | {p['flops'] / 1e9:.2f} | {p['seconds'] * 1e3:.1f} | {p['flops'] / p['seconds'] / 1e9:.1f} "
            f"| {p['flops'] / p['seconds'] / rf['peak_flops']:.0%} | {p['seconds'] / ts['ours_seconds']:.0%} |"
        )
    parts_seconds = sum(p["seconds"] for p in rf["parts"])
    lines.append(
        f"| the rest (optimizer update, splice, overlap between parts) | | "
        f"{(ts['ours_seconds'] - parts_seconds) * 1e3:.1f} | | | {1 - parts_seconds / ts['ours_seconds']:.0%} |"
    )
    lines += [
        "",
        "## Input pipeline",
        "",
        f"Decode + preprocess of {pipe['clip_seconds']:g}-s clips (8 frames at 224 px + 8 audio fbank clips), one process: "
        f"seeking {pipe['ours_clips_per_s']:.2f} clips/s/core vs full decode {pipe['baseline_clips_per_s']:.2f} "
        f"(**{pipe['ratio']:.2f}×** wall, {pipe['ratio_cpu']:.2f}× CPU time). The bench step consumes "
        f"{pipe['step_consumes_clips_per_s']:.2f} clips/s: keeping up takes {pipe['cores_needed_to_keep_up']:.2f} cores of decoding.",
        "",
        "## Generation (greedy, same weights, same tokens checked first)",
        "",
        "| config | params | batch | prompt | new | decode tok/s ours / transformers | decode × | prefill × |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in r["generation"]:
        lines.append(
            f"| {g['config']} | {g['parameters']:,} | {g['batch']} | {g['prompt']} | {g['new_tokens']} | "
            f"{g['decode_tokens_per_s']['ours']} / {g['decode_tokens_per_s']['transformers']} | "
            f"{g['decode_speedup']} | {g['prefill_speedup']} |"
        )
    lines += [
        "",
        "## Frozen-feature cache",
        "",
        "| step | full size (" + fc["full_size_config"] + f"), TFLOP per example ({fc['full_flops_from']} HLO) "
        "| bench GFLOP | bench s/step |",
        "|---|---|---|---|",
        f"| end to end | {fc['full_flops_end_to_end'] / 1e12:.2f} | {fc['bench_end_to_end']['flops'] / 1e9:.1f} | {fc['bench_end_to_end']['seconds']:.3f} |",
        f"| from cached features | {fc['full_flops_cached'] / 1e12:.2f} | {fc['bench_cached']['flops'] / 1e9:.1f} | {fc['bench_cached']['seconds']:.3f} |",
        f"| **end to end / cached** | **{fc['full_flops_ratio']:.2f}×** | {fc['bench_flops_ratio']:.2f}× | **{fc['bench_time_ratio']:.2f}×** |",
        f"\nFirst-step loss, end to end vs cached: differ by {fc['same_first_loss']:.1e}.",
    ]
    return "\n".join(lines)


def define_flags() -> None:
    """The command line's flags (defined only when run as a script)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config",
        f"{REPO_CONFIG}:llm=bench",
        "the model timed (the config file's llm=tiny and llm=llama2_7b_chat give the other two sizes)",
    )
    flags.DEFINE_bool("quick", False, "smaller batch and fewer repeats (CI)")
    flags.DEFINE_string("json", None, "write the report's numbers here")
    flags.DEFINE_string("markdown", None, "write the Markdown report here")


def main(argv) -> None:
    """absl's entry point: nothing returned, since absl passes a return value to sys.exit."""
    from absl import flags
    from ml_collections import config_flags

    del argv
    f = flags.FLAGS
    config_path = config_flags.get_config_filename(f["config"]).partition(":")[0]  # the file, without its argument
    report = run(f.quick, f.config, config_path, log=lambda s: print(s, file=sys.stderr, flush=True))
    text = markdown(report)
    print(text)
    if f.json:
        Path(f.json).write_text(json.dumps(report, indent=1) + "\n")
    if f.markdown:
        Path(f.markdown).write_text(text + "\n")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
