"""The GPU check: our stage-1 train step on one CUDA GPU in bf16, against the PyTorch reference on the same GPU.

    python launch/gpu_check.py                           # one CUDA GPU: both steps, every attention implementation
    python launch/gpu_check.py --json=gpu_check.json --timed_steps=10 --batch_size=32
    python launch/gpu_check.py --dry_run                 # a CPU: every code path at the tiny size, in seconds

Two steps, each trained by us with every attention implementation that runs on this device (`attention_impl`
of every tower: `xla`, `dot_product_attention`; `splash` is TPU-only and listed as not run) and by the PyTorch
reference of `python -m vllama_jax.bench` (transformers' modules, `testing/torch_reference.py`) under bf16
autocast and under fp16 autocast with a GradScaler (the original's own setting):
- `bench`: the `bench` model of configs/video_llama.py, its frozen towers in bf16 as the full-size recipe keeps
  them;
- `llama2_7b_4_layers`: the llama2_7b_chat recipe (EVA ViT-g, BLIP-2 Q-Former, video Q-Former as the recipe,
  frozen towers in bf16, scanned) with 4 of LLaMA-2-7B's 32 layers.
Both at the stage-1 recipe's batch (32 clips × 8 frames, 32 caption tokens), the trainable Q-Former's dropout off
so that the first losses can be compared. The PyTorch model's weights reach ours through the checkpoint
converter. Printed: seconds per step (median), TFLOP/s, MFU against the GPU's bf16 peak in
vllama_jax/accelerators.py, each of our steps against PyTorch's, the first step's losses; the same in the JSON.

Needs JAX (CUDA), PyTorch (CUDA), transformers, flax, optax and absl, nothing else: not grain, PyAV,
ml-collections, array-record, librosa, tensorflow-datasets or orbax (tests/e2e/test_gpu_check.py runs the dry run
with those made unimportable). It runs the checkout it lies in, installed or not. Exits 1 when a run fails or the
first losses disagree, after printing everything. Details: launch/README.md.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# before JAX starts: allocate GPU memory as needed rather than 75 % of it at once, leaving PyTorch its share
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's vllama_jax (an offline machine may not have it installed)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from vllama_jax import accelerators, sharding  # noqa: E402
from vllama_jax.bench.train_step import TorchTrainer, make_batch  # noqa: E402
from vllama_jax.convert.video_llama import UNUSED_KEYS, load_state_dict, scanned_subtrees, video_llama_rules  # noqa: E402
from vllama_jax.models.video_llama import Branch, VideoLlama, VideoLlamaConfig, init_params  # noqa: E402
from vllama_jax.train.flops import lowered_flops, scan_aware_flops  # noqa: E402
from vllama_jax.train.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from vllama_jax.train.step import init_state, make_train_step, video_llama_loss  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("dry_run", False, "on a CPU: the tiny model's sizes, one timed step; every code path runs")
flags.DEFINE_string("json", "gpu_check.json", "where the JSON report goes")
flags.DEFINE_integer("timed_steps", 10, "steps timed per run (after the first step and 2 warm-up steps)")
flags.DEFINE_integer("batch_size", 0, "clips per step (0: the stage-1 recipe's global batch, 32)")
flags.DEFINE_list("models", ["bench", "llama2_7b_4_layers"], "which of the two steps to check")

IMPLEMENTATIONS = ("xla", "dot_product_attention", "splash")
AUTOCAST = ("bfloat16", "float16")  # PyTorch's runs: bf16 as ours, fp16 as the original trains
NUM_FRAMES = 8  # configs/video_llama.py's data.num_frames
# first-step losses (about log(vocabulary) at these random weights) of two bf16 programs may differ this much
LOSS_TOLERANCE = 0.05
# what the dry run keeps from each step's model when it takes the tiny model's sizes
PRECISION_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How big each step is and how many steps each run takes."""

    batch_size: int  # clips
    num_frames: int
    max_txt_len: int  # caption tokens
    warmup_steps: int  # after the first step, before the timed ones
    timed_steps: int


def recipes():
    """configs/video_llama.py as a module: its `model()` and `recipe()` (no ml_collections needed)."""
    path = REPO / "configs" / "video_llama.py"
    spec = importlib.util.spec_from_file_location("_vllama_config_video_llama", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checked_models(configs, dry_run: bool) -> dict[str, dict]:
    """{step name: model dict} of the two steps checked (see the module docstring)."""
    full = configs.model("llama2_7b_chat")
    bench = configs.model("bench")
    for key, tower in full.items():  # the full-size recipe's precision on the bench model's towers
        if isinstance(tower, dict) and tower.get("param_dtype") == "bfloat16":
            bench[key].update(dtype=tower["dtype"], param_dtype=tower["param_dtype"])
    full["llm"]["num_layers"] = 4
    models = {"bench": bench, "llama2_7b_4_layers": full}
    for model in models.values():
        model["video_qformer"].update(hidden_dropout=0.0, attention_dropout=0.0)  # PyTorch's runs in eval mode
        if dry_run:  # the tiny model's sizes, one layer per tower (a Q-Former layer with cross-attention)
            for key, value in configs.SMALL_MODELS["tiny"].items():
                if isinstance(value, dict):
                    model[key].update({k: v for k, v in value.items() if k not in PRECISION_FIELDS}, num_layers=1)
                else:
                    model[key] = value
            for key in ("qformer", "video_qformer"):
                model[key]["cross_attention_freq"] = 1
    return models


def with_attention(model: dict, impl: str) -> dict | None:
    """The model dict with every tower's `attention_impl` set to `impl`; None when no tower has that field."""
    towers = [k for k, v in model.items() if isinstance(v, dict) and "attention_impl" in v]
    if not towers:
        return model if impl == "xla" else None  # the einsum path is what a checkout without the field runs
    return {k: {**v, "attention_impl": impl} if k in towers else v for k, v in model.items()}


def model_config(model: dict) -> VideoLlamaConfig:
    """The dataclass, with `<ImageHere>` just past the vocabulary (as LLaMA's tokenizer places it)."""
    cfg = VideoLlamaConfig.from_dict(model)
    return dataclasses.replace(cfg, image_token_id=cfg.llm.vocab_size)


def jax_step(cfg: VideoLlamaConfig, opt_cfg: OptimizerConfig):
    """(module, optimizer, jitted train step): the trainer's step (`make_train_step` over the caption loss) on one
    device, the train state donated. The trainer wraps the same function in a mesh's shardings."""
    module = VideoLlama(cfg)
    optimizer = make_optimizer(opt_cfg)
    step = make_train_step(video_llama_loss(module, Branch("visual")), optimizer, opt_cfg)
    return module, optimizer, jax.jit(step, donate_argnums=0)


def split(params: dict) -> tuple[dict, dict]:
    trainable = Branch("visual").trainable
    return {k: v for k, v in params.items() if k in trainable}, {k: v for k, v in params.items() if k not in trainable}


def model_flops(cfg: VideoLlamaConfig, opt_cfg: OptimizerConfig, batch: dict) -> float:
    """FLOPs of one step on the einsum path: XLA's cost analysis of the lowered program, every scanned layer
    counted (`train.flops.scan_aware_flops`). The same math for every implementation and for PyTorch: a fused
    kernel is a custom call whose FLOPs XLA does not count, so this one count serves every row."""
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}

    def flops_of(shallow: VideoLlamaConfig) -> float:
        module, optimizer, step = jax_step(shallow, opt_cfg)
        params = sharding.unboxed(jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0))))
        trainable, frozen = split(params)
        state = jax.eval_shape(lambda t: init_state(t, optimizer, jax.random.PRNGKey(1)), trainable)
        return lowered_flops(step.lower(state, frozen, abstract_batch))

    return scan_aware_flops(cfg, flops_of)


def converted(torch_model, cfg: VideoLlamaConfig) -> dict:
    """The PyTorch model's weights as our parameters (through the converter), each in its dtype, in host memory
    (cast by numpy: an XLA cast would compile one program per shape)."""
    module = VideoLlama(cfg)
    abstract = sharding.unboxed(jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0))))
    params = load_state_dict(torch_model.original_state_dict(), video_llama_rules(cfg), abstract,
                             scanned_subtrees(cfg), ignore=UNUSED_KEYS, source_name="the PyTorch reference model")
    return jax.tree_util.tree_map(lambda value, like: np.asarray(value, like.dtype), params, abstract)


def timed(step_once, plan: Plan) -> list[float]:
    for _ in range(plan.warmup_steps):
        step_once()
    times = []
    for _ in range(plan.timed_steps):
        started = time.perf_counter()
        step_once()
        times.append(time.perf_counter() - started)
    return times


def run_ours(cfg: VideoLlamaConfig, opt_cfg: OptimizerConfig, params: dict, batch: dict, plan: Plan) -> dict:
    """Compile, one step (its loss), then the timed steps. `params` in host memory."""
    _, optimizer, step = jax_step(cfg, opt_cfg)
    trainable, frozen = jax.device_put(split(params))
    state = init_state(trainable, optimizer, jax.random.PRNGKey(1))
    batch = jax.device_put(batch)
    started = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_seconds = time.perf_counter() - started
    state, metrics = compiled(state, frozen, batch)
    first_loss = float(metrics["loss"])

    def step_once():
        nonlocal state
        state, out = compiled(state, frozen, batch)
        jax.block_until_ready((state, out))

    times = timed(step_once, plan)
    return {"compile_seconds": compile_seconds, "first_loss": first_loss, "step_times": times}


def run_pytorch(torch_model, initial: dict, opt_cfg: OptimizerConfig, batch: dict, autocast: str, device: str,
                plan: Plan) -> dict:
    """The reference's step under `autocast` from the initial float32 weights: one step (its loss), then timed."""
    import torch

    torch_model.float().load_state_dict(initial)
    trainer = TorchTrainer(torch_model, opt_cfg, device=device, autocast=autocast)
    inputs = trainer.batch(batch)
    first_loss = trainer.step(inputs)
    times = timed(lambda: trainer.step(inputs), plan)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"first_loss": first_loss, "step_times": times, "peak_memory_bytes": peak}


def check_step(name: str, model: dict, opt_cfg: OptimizerConfig, plan: Plan, platform_name: str, torch_device: str,
               log=print) -> dict:
    """Every run of one step: ours per attention implementation, then PyTorch per autocast dtype."""
    from vllama_jax.testing.torch_reference import TorchVideoLlama

    started = time.perf_counter()
    cfg = model_config(model)
    batch = make_batch(cfg, plan.batch_size, plan.num_frames, plan.max_txt_len)
    batch = {k: batch[k] for k in Branch("visual").batch_keys()}
    torch_model = TorchVideoLlama(cfg, cfg.image_token_id)
    params = converted(torch_model, cfg)
    flops = model_flops(cfg, opt_cfg, batch)
    log(f"[{name}] PyTorch model built, weights converted, {_flop_text(flops)} per step "
        f"({time.perf_counter() - started:.0f} s)")
    runs = []
    for impl in IMPLEMENTATIONS:
        row = {"framework": "jax", "attention_impl": impl}
        impl_model = with_attention(model, impl)
        if impl == "splash" and platform_name != "tpu":
            row.update(status="not run", reason="the Pallas splash kernel is TPU-only (interpreted elsewhere: tests)")
        elif impl_model is None:
            row.update(status="not run", reason="this checkout's tower configs have no attention_impl field")
        else:
            row.update(_attempt(run_ours, model_config(impl_model), opt_cfg, params, batch, plan))
        runs.append(row)
        log(f"[{name}] ours, attention {impl}: {_brief(row)}")
    del params
    _free_memory(torch_device)
    initial = {k: v.detach().clone() for k, v in torch_model.state_dict().items()}
    for autocast in AUTOCAST:
        row = {"framework": "pytorch", "autocast": autocast}
        row.update(_attempt(run_pytorch, torch_model, initial, opt_cfg, batch, autocast, torch_device, plan))
        runs.append(row)
        _free_memory(torch_device)
        log(f"[{name}] PyTorch, {autocast} autocast: {_brief(row)}")
    del torch_model, initial
    _free_memory(torch_device)
    return {
        "model": model,
        "batch_size": plan.batch_size,
        "frames": plan.num_frames,
        "image_size": cfg.vision.image_size,
        "text_length": batch["input_ids"].shape[1],
        "flops": flops,
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }


def _free_memory(device: str) -> None:
    """On a GPU, give back what the last runs held (for the next run's room and PyTorch's peak-memory figure)."""
    import torch

    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _attempt(run, *args) -> dict:
    """A run's figures, or its error: one failing implementation must not hide the others' numbers."""
    try:
        out = run(*args)
    except Exception as err:  # noqa: BLE001 (reported in the table and the JSON, and the exit status)
        return {"status": "failed", "reason": f"{type(err).__name__}: {err}"[:2000]}
    return {"status": "ok", **out, "step_seconds": statistics.median(out["step_times"])}


def _brief(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    return f"{row['step_seconds'] * 1e3:.1f} ms per step, first loss {row['first_loss']:.4f}"


def summarise(step: dict, peak_flops: float | None) -> list[str]:
    """Fills in each run's TFLOP/s, MFU and ratios against PyTorch; returns the step's problems."""
    runs, problems = step["runs"], []
    pytorch = {r["autocast"]: r for r in runs if r["framework"] == "pytorch" and r["status"] == "ok"}
    reference_loss = next((r["first_loss"] for r in runs if r["status"] == "ok" and r["framework"] == "jax"), None)
    for run in runs:
        if run["status"] == "failed":
            problems.append(f"{_label(run)} failed: {run['reason']}")
        if run["status"] != "ok":
            continue
        run["tflops_per_second"] = step["flops"] / run["step_seconds"] / 1e12
        run["mfu"] = None if peak_flops is None else step["flops"] / run["step_seconds"] / peak_flops
        if run["framework"] == "jax":
            run["pytorch_over_ours"] = {k: r["step_seconds"] / run["step_seconds"] for k, r in pytorch.items()}
        run["loss_diff"] = None if reference_loss is None else abs(run["first_loss"] - reference_loss)
        if run["loss_diff"] is not None and not run["loss_diff"] <= LOSS_TOLERANCE:
            problems.append(f"{_label(run)}: first loss {run['first_loss']:.4f} differs from ours (xla) "
                            f"{reference_loss:.4f} by more than {LOSS_TOLERANCE}")
    return problems


def _label(run: dict) -> str:
    if run["framework"] == "jax":
        return f"ours, attention {run['attention_impl']}"
    return f"PyTorch, {run['autocast']} autocast"


def table(report: dict) -> str:
    m = report["machine"]
    mfu_note = (f"MFU against {report['peak_flops'] / 1e12:.0f} TFLOP/s ({report['peak_source']})"
                if report["peak_flops"] else f"no MFU: {report['peak_source']}")
    lines = [f"GPU check on {m['device_kind']} ({m['platform']}); jax {m['jax']}, torch {m['torch']}, "
             f"transformers {m['transformers']}; {mfu_note}. Took {report['seconds']:.0f} s."]
    for name, step in report["steps"].items():
        lines += [
            "",
            f"{name}: batch {step['batch_size']} × {step['frames']} frames at {step['image_size']} px, "
            f"{step['text_length']} tokens; {_flop_text(step['flops'])} per step (the einsum path's, XLA's count)",
            "(PyTorch bf16 / this: PyTorch's seconds per step under bf16 autocast over this run's)",
            "| run | ms / step | TFLOP/s | MFU | PyTorch bf16 / this | PyTorch fp16 / this | first loss |",
            "|---|---|---|---|---|---|---|",
        ]
        for run in step["runs"]:
            if run["status"] != "ok":
                lines.append(f"| {_label(run)} | {run['status']}: {run['reason'][:90]} | | | | | |")
                continue
            ratios = run.get("pytorch_over_ours", {})
            cells = [f"{run['step_seconds'] * 1e3:.1f}", f"{run['tflops_per_second']:.3g}",
                     "n/a" if run["mfu"] is None else f"{100 * run['mfu']:.1f} %",
                     *(f"{ratios[k]:.2f}×" if k in ratios else "" for k in AUTOCAST), f"{run['first_loss']:.4f}"]
            lines.append(f"| {_label(run)} | " + " | ".join(cells) + " |")
    if report["problems"]:
        lines += ["", "PROBLEMS:", *(f"- {p}" for p in report["problems"])]
    return "\n".join(lines)


def _flop_text(flops: float) -> str:
    return f"{flops / 1e12:.2f} TFLOP" if flops >= 1e11 else f"{flops / 1e9:.3f} GFLOP"


def machine() -> dict:
    import torch
    import transformers

    device = jax.devices()[0]
    return {"device_kind": device.device_kind, "platform": device.platform, "host": platform.node(),
            "jax": jax.__version__, "torch": torch.__version__, "cuda_torch": torch.version.cuda,
            "transformers": transformers.__version__, "python": platform.python_version()}


def main(argv):
    del argv
    import torch

    started = time.perf_counter()
    device = jax.devices()[0]
    if not FLAGS.dry_run and (device.platform != "gpu" or not torch.cuda.is_available()):
        sys.exit(f"no CUDA GPU: JAX's first device is {device.device_kind} ({device.platform}), torch.cuda "
                 f"available: {torch.cuda.is_available()}. On a CPU run `python launch/gpu_check.py --dry_run`.")
    configs = recipes()
    row = configs.recipe("vision_stage1")
    opt_cfg = OptimizerConfig(**{k: row[k] for k in configs.OPTIMIZER_KEYS})
    if FLAGS.dry_run:
        plan = Plan(FLAGS.batch_size or 2, 2, 8, warmup_steps=0, timed_steps=1)
    else:
        plan = Plan(FLAGS.batch_size or row["batch"], NUM_FRAMES, row["max_txt_len"], 2, FLAGS.timed_steps)
    known = accelerators.by_device_kind(device.device_kind)
    report = {
        "machine": machine(),
        "dry_run": FLAGS.dry_run,
        "peak_flops": known.peak_flops if known else None,
        "peak_source": (f"{known.name}, {known.source}" if known else
                        f"{device.device_kind!r} is not in vllama_jax/accelerators.py"),
        "plan": dataclasses.asdict(plan),
        "steps": {},
    }
    print(f"GPU check on {device.device_kind}{' (dry run)' if FLAGS.dry_run else ''}", flush=True)

    def log(text):
        print(f"{time.perf_counter() - started:6.1f} s  {text}", flush=True)

    torch_device = "cuda" if device.platform == "gpu" else "cpu"
    models = checked_models(configs, FLAGS.dry_run)
    unknown = set(FLAGS.models) - set(models)
    if unknown:
        sys.exit(f"--models: unknown {sorted(unknown)}; known: {sorted(models)}")
    for name, model in models.items():
        if name not in FLAGS.models:
            continue
        report["steps"][name] = check_step(name, model, opt_cfg, plan, device.platform, torch_device, log)
    report["problems"] = [p for step in report["steps"].values() for p in summarise(step, report["peak_flops"])]
    report["seconds"] = time.perf_counter() - started
    print("\n" + table(report))
    Path(FLAGS.json).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {FLAGS.json}")
    if report["problems"]:
        sys.exit(1)


if __name__ == "__main__":
    # the spelling (--dry-run) and absl's (--dry_run) both work
    sys.argv = ["--dry_run" if a == "--dry-run" else a for a in sys.argv]
    app.run(main)
