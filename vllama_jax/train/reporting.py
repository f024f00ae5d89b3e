"""What a run shows while it trains: a progress bar, metrics.jsonl, TensorBoard event files, a loss-curve PNG,
throughput and model-FLOPs utilisation (MFU).

MFU = FLOPs of one compiled step per device (XLA's cost analysis, so it counts what the program really runs,
rematerialisation included) / step seconds / the device's peak. Peaks are the vendors' dense bf16 figures;
a CPU has no published one, so it is measured once with a large float32 matmul (`train.peak_flops` overrides).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vllama_jax import accelerators


def measured_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of one jitted size x size float32 matmul on the default device, best of `repeats`."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def peak_flops(device, override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if override:
        return override, "config train.peak_flops"
    known = accelerators.by_device_kind(device.device_kind)
    if known is not None:
        return known.peak_flops, f"{known.name} spec sheet (bf16 dense)"
    return measured_matmul_flops(), f"measured: 1024² float32 matmul on {device.device_kind}"


def step_cost(compiled) -> dict[str, float]:
    """Per-device FLOPs and memory of a compiled step, from XLA's cost and memory analyses. `peak_bytes` =
    arguments + temporaries + outputs not aliased to a donated argument. (XLA counts a scanned loop's body once:
    `train.flops.scan_aware_flops` corrects the FLOPs of scanned steps.)"""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    out = {"flops": float(cost.get("flops", 0.0))}
    if memory is not None:
        out.update(argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
                   temp_bytes=memory.temp_size_in_bytes, alias_bytes=memory.alias_size_in_bytes)
        out["peak_bytes"] = out["argument_bytes"] + out["temp_bytes"] + out["output_bytes"] - out["alias_bytes"]
    return out


def startup(step, cost: dict, peak: tuple[float, str], *, workdir: Path, global_batch: int, text_length: int,
            log=print) -> list[str]:
    """What a run states before its first step (process 0): devices and mesh, parameter and optimizer-state
    sizes (frozen / trainable), how the largest arrays are sharded, per-device memory and FLOPs of the compiled
    step; logged and written to `workdir/startup.json` (what `vllama-plan` predicts for the same config and mesh).
    `step` is the run's `train.sharded.ShardedStep`."""
    sizes = step.sizes()
    devices = jax.devices()
    lines = [
        f"{jax.process_count()} process(es), {len(devices)} {devices[0].device_kind} device(s), "
        f"mesh {dict(step.mesh.shape)}",
        f"parameters: {sizes['trainable']:,} trainable ({sizes['trainable_bytes'] / 2**20:.1f} MiB), "
        f"{sizes['frozen']:,} frozen ({sizes['frozen_bytes'] / 2**20:.1f} MiB)"
        + (f"; not read by the step (cached features): {', '.join(sizes['not_read'])}" if sizes["not_read"] else ""),
        f"optimizer state: {sizes['optimizer_bytes'] / 2**20:.1f} MiB, for the trainable parameters only",
    ]
    state, frozen, _ = step.abstract_arguments()
    flat = jax.tree_util.tree_flatten_with_path({**state.trainable, **frozen})[0]
    for path, leaf in sorted(flat, key=lambda kv: -int(np.prod(kv[1].shape)))[:4]:
        lines.append(
            f"  sharding {jax.tree_util.keystr(path)} {tuple(leaf.shape)} {np.dtype(leaf.dtype).name}: "
            f"{leaf.sharding.spec}"
        )
    if "argument_bytes" in cost:
        lines.append(
            "per device: "
            + ", ".join(
                f"{k.removesuffix('_bytes')} {cost[k] / 2**20:.1f} MiB"
                for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes")
            )
        )
    lines.append(
        f"step: {cost['flops'] / 1e9:.3f} GFLOP per device; peak {peak[0] / 1e12:.3g} TFLOP/s per device ({peak[1]})"
    )
    for line in lines:
        log(line)
    (workdir / "startup.json").write_text(
        json.dumps(
            {
                "mesh": dict(step.mesh.shape),
                "devices": [str(d) for d in devices],
                "global_batch": global_batch,
                "text_length": text_length,
                "cost": cost,
                "peak_flops": peak[0],
                "sizes": sizes,
                "summary": lines,
            },
            indent=1,
        )
        + "\n"
    )
    return lines


class Reporter:
    """Process 0's outputs for each step: metrics.jsonl, TensorBoard scalars, a progress bar (on a terminal)
    and a log line every `log_every` steps. Other processes get a Reporter that does nothing."""

    def __init__(self, workdir: Path, *, enabled: bool, total_steps: int, start_step: int, log_every: int, log=print):
        self.enabled, self.log_every, self.log = enabled, log_every, log
        self._jsonl = self._writer = self._bar = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        self._jsonl = open(workdir / "metrics.jsonl", "a")
        self._writer = SummaryWriter(str(workdir / "tensorboard"), flush_secs=10)
        # disable=None: a bar on a terminal only; logs and CI get the periodic lines instead
        self._bar = tqdm(total=total_steps, initial=start_step, disable=None, unit="step", dynamic_ncols=True)

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)
        shown = {
            "loss": f"{record['loss']:.4f}",
            "lr": f"{record['learning_rate']:.2e}",
            "ex/s": f"{record['examples_per_second']:.1f}",
            "tok/s": f"{record['tokens_per_second']:.0f}",
            "MFU": f"{record['mfu']:.1%}",
        }
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)
        if (step - 1) % self.log_every == 0 and self._bar.disable:
            self.log(f"step {step}: " + " ".join(f"{k} {v}" for k, v in shown.items()))

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._writer.close()
        self._jsonl.close()


def read_metrics(path: Path) -> dict[int, dict]:
    """step -> record from metrics.jsonl; after a resume the rewritten steps' last records win."""
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records[record["step"]] = record
    return records


def plot_loss(metrics_path: Path, png_path: Path) -> Path | None:
    """The loss curve (raw and a 20-step moving average) and the learning rate, as a PNG. None if no steps."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array(sorted(records))
    loss = np.array([records[s]["loss"] for s in steps])
    lr = np.array([records[s]["learning_rate"] for s in steps])
    window = min(20, len(loss))
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot(steps, loss, color="0.75", linewidth=0.8, label="loss")
    top.plot(steps[window - 1 :], smooth, color="C0", label=f"{window}-step mean")
    top.set_ylabel("caption loss")
    top.legend()
    bottom.plot(steps, lr, color="C1")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
