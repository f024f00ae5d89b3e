"""`vllama-plan`: size a slice before renting it. The full-size train step (and a decode step) is compiled ahead
of time on abstract inputs; nothing is allocated.

    vllama-plan --config configs/video_llama.py:llama2_7b_chat --topology v5p:2x2x1 --mesh fsdp=4 --json plan.json
    vllama-plan --config configs/video_llama.py:llama2_13b_chat --topology v5p:4x4x8 --mesh fsdp=32,tensor=4
    vllama-plan --config configs/video_llama.py:llama2_7b_chat --topology v5e:16x16 --num_slices 2 --max_batch v5e
    vllama-plan --config configs/video_llama.py:llama2_7b_chat --devices 8 --mesh fsdp=4,tensor=2 --decode
    (ml-collections overrides work: --config.data.num_frames=16)

Two compilers. `--topology NAME` compiles with the TPU compiler itself (XLA:TPU from libtpu, `pip install -e
'.[tpu]'`) for that slice's abstract chips, no TPU attached (`tpu_topology.py`): its memory analysis is what the
pod would allocate, and it is the authority for every TPU figure the project gives. `--devices N` compiles with
XLA:CPU over N simulated CPU devices, for machines without libtpu and for tests: the sharding and the parameter,
optimizer and batch bytes are exact, but the CPU compiler's temporaries are not a TPU's or a GPU's (it gathers
FSDP weights whole and in float32), so read them as a rough upper bound.

Per device it reports the compiler's memory analysis (arguments, outputs, temporaries, and the peak: the
compiler's own figure from its buffer assignment, beside the sum arguments + temporaries + outputs − aliased), the
FLOPs of one step (scanned layers counted per layer), XLA:TPU's own estimate of the step's time, the parameter and
optimizer-state bytes split trainable / frozen, and which accelerators' HBM the peak fits. `--max_batch` finds the
largest per-device batch that fits the named accelerators: memory grows linearly with the batch, so two compiles
give the line and one or two more confirm its prediction.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

from vllama_jax import accelerators as hardware


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=4,tensor=2' -> {'data': 1, 'fsdp': 4, 'tensor': 2} (unnamed axes are 1; one may be -1)."""
    from vllama_jax.sharding import MESH_AXES

    shape = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in shape:
            raise ValueError(f"--mesh {text!r}: unknown axis {name!r}; axes are {MESH_AXES}")
        shape[name] = int(value)
    return shape


def _memory(compiled) -> dict[str, int]:
    """XLA's per-device memory analysis of a compiled step, with its peak (reporting.step_cost, FLOPs apart:
    they are counted scan-aware below). XLA also reports its own peak (`compiler_peak_bytes`, XLA:TPU and XLA:CPU
    alike): the most the program holds at once by its buffer assignment, below the sum of arguments, temporaries
    and outputs where buffers are reused."""
    from vllama_jax.train.reporting import step_cost

    memory = {k: v for k, v in step_cost(compiled).items() if k != "flops"}
    stats = compiled.memory_analysis()
    compiler_peak = getattr(stats, "peak_memory_in_bytes", 0) if stats is not None else 0
    if compiler_peak:
        memory["compiler_peak_bytes"] = compiler_peak
    return memory


def fit_bytes(memory: dict[str, int]) -> int:
    """The peak a plan is sized by: the compiler's own where it reports one, else the sum."""
    return memory.get("compiler_peak_bytes", memory["peak_bytes"])


def _target(mesh, topology: str | None, num_slices: int) -> dict:
    """What the plan was compiled for: the device kind and, for a TPU slice, its topology and libtpu."""
    from vllama_jax import tpu_topology

    device = mesh.devices.flat[0]
    out = {"device_kind": device.device_kind, "platform": device.platform, "topology": topology}
    if topology:
        out.update(num_slices=num_slices, compiler=f"XLA:TPU (libtpu {tpu_topology.libtpu_version()})")
    else:
        out["compiler"] = f"XLA:{device.platform.upper()} (simulated devices)" if device.platform == "cpu" else (
            f"XLA:{device.platform.upper()}")
    return out


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the first device's shards)."""
    import jax
    import numpy as np

    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)
    )


def plan_train(
    config,
    mesh,
    per_device_batch: int,
    text_length: int | None = None,
    *,
    cached: bool = False,
    flops: bool = True,
    topology: str | None = None,
    num_slices: int = 1,
) -> dict:
    """Compile `config`'s train step for `per_device_batch` examples per data-parallel device on `mesh` (simulated
    CPU devices, or a TPU `topology`'s compile-only chips)."""
    from vllama_jax.config import model_config
    from vllama_jax.train.flops import compiled_costs
    from vllama_jax.train.sharded import build_sharded_step, step_costs

    model_cfg = model_config(config)
    text_length = text_length or default_text_length(config, model_cfg)
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    build = build_sharded_step(
        config, model_cfg, text_length, mesh=mesh, batch_size=per_device_batch * replicas, cached=cached
    )
    started = time.perf_counter()
    compiled = build.lower().compile()
    seconds = time.perf_counter() - started
    state, frozen, batch = build.abstract_arguments()
    result = {
        "step": "train",
        "config": config.name,
        "recipe": config.recipe,
        "branch": config.train.get("branch") or "+".join(config.train.trainable),  # Video-LLaVA: what it trains
        "cached": cached,
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        **_target(mesh, topology, num_slices),
        "per_device_batch": per_device_batch,
        "global_batch": per_device_batch * replicas,
        "text_length": text_length,
        "memory": _memory(compiled),
        "compile_seconds": round(seconds, 1),
        "per_device_parameter_bytes": {
            "trainable": per_device_bytes(state.trainable),
            "frozen": per_device_bytes(frozen),
            "optimizer": per_device_bytes(state.opt_state),
            "batch": per_device_bytes(batch),
        },
        "global": build.sizes(),
    }
    if flops:
        started = time.perf_counter()
        costs = step_costs(
            config,
            model_cfg,
            text_length,
            mesh=mesh,
            batch_size=per_device_batch * replicas,
            cached=cached,
            unscanned=compiled_costs(compiled),
        )
        result["flops_per_device"] = costs["flops"]
        if "optimal_seconds" in costs:  # XLA:TPU's cost model, every layer counted: an estimate, not a measurement
            result["estimated_step_seconds"] = costs["optimal_seconds"]
        result["flops_seconds"] = round(time.perf_counter() - started, 1)
    return result


def default_text_length(config, model_cfg) -> int:
    """Stage 1's layout, [BOS] + soft tokens + max_txt_len caption tokens (stage 2's prompts add their text:
    pass --text_length for those)."""
    from vllama_jax.config import branch
    from vllama_jax.train.inputs import text_length

    if config.get("family") == "video_llava":  # a fixed bucket: expanded placeholders + text
        return config.data.text_length
    return text_length(branch(config), model_cfg, config.data.max_txt_len)


def plan_decode(
    config, mesh, per_device_batch: int, cache_length: int, *, topology: str | None = None, num_slices: int = 1
) -> dict:
    """Compile one cached decoding step of the config's LLM (batch × `cache_length` KV slots) on `mesh`, with one
    cache per layer as `vllama-chat` serves it (a session unstacks scanned layers: a scanned cache is copied
    through the loop every token)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from vllama_jax import sharding
    from vllama_jax.config import model_config
    from vllama_jax.infer.generate import GenerationConfig, advance, start
    from vllama_jax.models.llama import CACHE_AXES, LlamaForCausalLM
    from vllama_jax.sharded_model import ShardedModel, rules_of
    llm_cfg = dataclasses.replace(model_config(config).llm, scan_layers=False)
    llm = LlamaForCausalLM(llm_cfg)
    model = ShardedModel(
        llm, lambda rng: llm.init(rng, jnp.zeros((1, 1), jnp.int32))["params"], (), mesh, rules_of(config), config.seed
    )
    rules = model.rules
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = per_device_batch * replicas
    gen = GenerationConfig(max_new_tokens=cache_length - 1, eos_token_id=2)
    params = model.abstract()
    prompt = jax.ShapeDtypeStruct((batch, 1, llm_cfg.hidden_size), jnp.dtype(llm_cfg.dtype))
    with model.on_mesh():
        state = jax.eval_shape(lambda p, e: start(llm, p, e, jnp.ones(e.shape[:2], bool), gen), params, prompt)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        batch_leading = lambda x: (
            sharding.batch_sharding(mesh, len(x.shape), rules) if x.shape and x.shape[0] == batch else replicated
        )  # noqa: E731
        shardings = {
            k: (
                sharding.cache_shardings(v, CACHE_AXES, mesh, rules)
                if k == "cache"
                else jax.tree_util.tree_map(batch_leading, v)
            )
            for k, v in state.items()
        }
        state = sharding.with_shardings(state, shardings)
        step = jax.jit(lambda p, s: advance(llm, p, s, gen), out_shardings=shardings, donate_argnums=1)
        started = time.perf_counter()
        compiled = step.lower(params, state).compile()
    return {
        "step": "decode",
        "config": config.name,
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        **_target(mesh, topology, num_slices),
        "per_device_batch": per_device_batch,
        "global_batch": batch,
        "cache_length": cache_length,
        "memory": _memory(compiled),
        "compile_seconds": round(time.perf_counter() - started, 1),
        **_decode_costs(compiled),  # one token per row; the decoder is unscanned, so XLA counts every layer
        "per_device_parameter_bytes": {
            "frozen": per_device_bytes(params),
            "kv_cache": per_device_bytes(state["cache"]),
        },
    }


def _decode_costs(compiled) -> dict:
    from vllama_jax.train.flops import compiled_costs

    costs = compiled_costs(compiled)
    out = {"flops_per_device": costs["flops"]}
    if "optimal_seconds" in costs:
        out["estimated_step_seconds"] = costs["optimal_seconds"]
    return out


def largest_batch(peak_of, capacity: int, limit: int = 4096) -> tuple[int, dict[int, int]]:
    """Largest per-device batch b <= limit with peak_of(b) <= capacity (0 if even 1 does not fit), and every
    peak measured on the way. The peak grows with b, about linearly: each probe is the batch where the line
    through the last two measurements reaches the capacity, kept strictly between the largest batch known to
    fit and the smallest known not to (bisection when the line points outside), so it ends when they meet."""
    seen: dict[int, int] = {}

    def peak(b):
        if b not in seen:
            seen[b] = peak_of(b)
        return seen[b]

    if peak(1) > capacity:
        return 0, seen
    lo, hi, last = 1, limit + 1, [1]
    guess = 2
    while hi - lo > 1:
        b = guess if lo < guess < hi else (lo + hi) // 2
        if peak(b) <= capacity:
            lo = b
        else:
            hi = b
        a = last[-1]
        last.append(b)
        slope = (peak(b) - peak(a)) / (b - a) if b != a else 0
        guess = int(b + (capacity - peak(b)) // slope) if slope > 0 else (lo + hi) // 2
        if guess == lo:  # the line says lo is the answer: check lo + 1 once
            guess = lo + 1
    return lo, seen


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _flop(n: float) -> str:
    return f"{n / 1e12:,.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:,.3g} GFLOP"


def report(result: dict, accelerators: list[str]) -> list[str]:
    """The plan as Markdown lines."""
    mem, pb = result["memory"], result["per_device_parameter_bytes"]
    mesh = " ".join(f"{k}={v}" for k, v in result["mesh"].items())
    what = (
        f"train step ({result['recipe']}, branch {result['branch']}{', cached features' if result['cached'] else ''}), "
        f"{result['per_device_batch']} example(s) per device (global batch {result['global_batch']}), "
        f"{result['text_length']} tokens"
        if result["step"] == "train"
        else f"decode step, {result['per_device_batch']} row(s) per device (global {result['global_batch']}), "
        f"{result['cache_length']}-slot KV cache"
    )
    slices = f" × {result['num_slices']} slices" if result.get("num_slices", 1) > 1 else ""
    where = (
        f"{result['topology']}{slices} ({result['devices']} {result['device_kind']} chips, compile-only)"
        if result.get("topology")
        else f"{result['devices']} simulated {result['device_kind']} devices"
        if result.get("platform") == "cpu"
        else f"{result['devices']} {result.get('device_kind', '')} devices"
    )
    lines = [
        f"### {result['config']}: {what}; mesh {mesh} on {where}; {result.get('compiler', 'XLA')}, "
        f"compiled in {result['compile_seconds']} s",
        "",
        "| per device | MiB |",
        "|---|---|",
    ]
    names = {
        "argument_bytes": "arguments",
        "output_bytes": "outputs",
        "temp_bytes": "temporaries",
        "alias_bytes": "outputs aliased to donated arguments",
    }
    lines += [f"| {label} | {_mib(mem[k])} |" for k, label in names.items()]
    if "compiler_peak_bytes" in mem:
        lines += [f"| arguments + temporaries + outputs − aliased | {_mib(mem['peak_bytes'])} |"]
        peak = _mib(mem["compiler_peak_bytes"])
        lines += [f"| **peak** (the compiler's own, from its buffer assignment) | **{peak}** |"]
    else:
        lines += [f"| **peak** (arguments + temporaries + outputs − aliased) | **{_mib(mem['peak_bytes'])}** |"]
    lines += [f"| of the arguments: {k.replace('_', ' ')} | {_mib(v)} |" for k, v in pb.items()]
    if "flops_per_device" in result:
        lines += [
            "",
            f"FLOPs per step per device: {_flop(result['flops_per_device'])}"
            + (
                f" (all devices: {_flop(result['flops_per_device'] * result['devices'])})"
                if result["step"] == "train"
                else ""
            ),
        ]
    if "estimated_step_seconds" in result:
        seconds = result["estimated_step_seconds"]
        lines += [f"step time, XLA:TPU's cost-model estimate (not a measurement): {seconds * 1e3:,.1f} ms"]
    if "global" in result:
        g = result["global"]
        lines += [
            f"parameters: {g['trainable']:,} trainable ({_mib(g['trainable_bytes'])} MiB), {g['frozen']:,} frozen "
            f"({_mib(g['frozen_bytes'])} MiB); optimizer state {_mib(g['optimizer_bytes'])} MiB (trainable only)"
        ]
    lines += ["", "| accelerator | HBM GiB | peak / HBM | fits |", "|---|---|---|---|"]
    peak = fit_bytes(mem)
    for name in accelerators:
        capacity = hardware.get(name).hbm_bytes
        lines.append(
            f"| {name} | {capacity / hardware.GIB:.1f} | {peak / capacity:.0%} "
            f"| {'yes' if peak <= capacity else 'no'} |"
        )
    for name, found in result.get("max_batch", {}).items():
        lines.append(
            f"\nlargest per-device batch on {name}: **{found['batch']}** (peaks measured, MiB: "
            + ", ".join(f"b={b}: {_mib(p)}" for b, p in sorted(found["peaks"].items()))
            + ")"
        )
    return lines


def run(
    config,
    *,
    devices: int,
    meshes: list[str],
    topology: str | None = None,
    num_slices: int = 1,
    batch_per_device: int = 1,
    text_length: int | None = None,
    cached: bool = False,
    flops: bool = True,
    max_batch: list[str] = (),
    accelerators: list[str] = (),
    decode: bool = False,
    decode_batch: int = 8,
    cache_length: int = 2048,
    log=print,
) -> list[dict]:
    """Plan the train step (and with `decode` a decode step) on each mesh, over `devices` simulated CPU devices or
    a TPU `topology`'s chips (`num_slices` slices); log the reports; return the results."""
    import jax

    from vllama_jax import tpu_topology
    from vllama_jax.sharding import make_mesh

    for name in (*max_batch, *accelerators):
        hardware.get(name)  # refuses an unknown name before anything compiles
    if topology:
        chips = tpu_topology.devices(topology, num_slices)
        build_mesh = lambda shape: tpu_topology.make_mesh(shape, chips, num_slices)  # noqa: E731
        default_mesh = f"data={num_slices},fsdp={len(chips) // num_slices}"
    else:
        if num_slices != 1:
            raise ValueError("--num_slices needs --topology (slices are TPU slices joined over DCN)")
        if len(jax.devices()) < devices:
            raise ValueError(
                f"asked for {devices} devices, JAX has {len(jax.devices())}: simulated devices must be "
                "requested (XLA_FLAGS=--xla_force_host_platform_device_count) before JAX is imported"
            )
        build_mesh = lambda shape: make_mesh(shape, jax.devices()[:devices])  # noqa: E731
        default_mesh = f"fsdp={devices}"
    target = dict(topology=topology, num_slices=num_slices)
    results = []
    for mesh_text in meshes or [default_mesh]:
        mesh = build_mesh(parse_mesh(mesh_text))
        result = plan_train(config, mesh, batch_per_device, text_length, cached=cached, flops=flops, **target)
        peaks = {batch_per_device: fit_bytes(result["memory"])}  # shared by the accelerators' searches

        def peak_of(b):
            if b not in peaks:
                plan = plan_train(config, mesh, b, text_length, cached=cached, flops=False, **target)
                peaks[b] = fit_bytes(plan["memory"])
            return peaks[b]

        if max_batch:
            result["max_batch"] = {}
            for name in max_batch:
                found, seen = largest_batch(peak_of, hardware.get(name).hbm_bytes)
                result["max_batch"][name] = {"batch": found, "peaks": seen}
        results.append(result)
        log("\n".join(report(result, accelerators)) + "\n")
        if decode:
            results.append(plan_decode(config, mesh, decode_batch, cache_length, **target))
            log("\n".join(report(results[-1], accelerators)) + "\n")
    return results


def _flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/video_llama.py:llama2_7b_chat", "the config to plan")
    flags.DEFINE_integer("devices", 8, "simulated CPU devices (XLA:CPU; without --topology)")
    flags.DEFINE_string(
        "topology", None, "a TPU slice to compile for with the TPU compiler, no TPU needed, e.g. v5p:2x2x1, v5e:4x4"
    )
    flags.DEFINE_integer("num_slices", 1, "TPU slices of --topology joined over DCN (the data axis spans them)")
    flags.DEFINE_multi_string(
        "mesh", [], "mesh axes, e.g. fsdp=8 or fsdp=4,tensor=2 (repeatable; default: fsdp=devices)"
    )
    flags.DEFINE_integer("batch_per_device", 1, "examples per data-parallel device")
    flags.DEFINE_integer("text_length", None, "tokens per example (default: stage 1's layout)")
    flags.DEFINE_bool("cached", False, "the step of a run reading the frozen-feature cache")
    flags.DEFINE_bool("flops", True, "count the step's FLOPs (a few shallow compiles)")
    flags.DEFINE_list(
        "max_batch", [], f"accelerators ({', '.join(hardware.ACCELERATORS)}) to find the largest per-device batch for"
    )
    flags.DEFINE_list("accelerators", ["v5e", "v5p", "v6e", "a100-80gb", "h100"], "accelerators the fit table shows")
    flags.DEFINE_bool("decode", False, "also plan one cached decoding step")
    flags.DEFINE_integer("decode_batch", 8, "decode rows per data-parallel device")
    flags.DEFINE_integer("cache_length", 2048, "KV-cache slots (prompt + new tokens)")
    flags.DEFINE_string("json", None, "also write the results here")


def _main(argv):
    from absl import flags

    del argv
    f = flags.FLAGS
    try:
        results = _run_flags(f)
    except (ValueError, RuntimeError) as error:  # a bad topology, mesh or accelerator name: one line, no traceback
        sys.exit(f"vllama-plan: {error}")
    if f.json:
        with open(f.json, "w") as out:
            json.dump(results, out, indent=1)


def _run_flags(f) -> list[dict]:
    return run(
        f.config,
        devices=f.devices,
        meshes=f.mesh,
        topology=f.topology,
        num_slices=f.num_slices,
        batch_per_device=f.batch_per_device,
        text_length=f.text_length,
        cached=f.cached,
        flops=f.flops,
        max_batch=f.max_batch,
        accelerators=f.accelerators,
        decode=f.decode,
        decode_batch=f.decode_batch,
        cache_length=f.cache_length,
        log=lambda s: print(s, flush=True),
    )


def cli():
    """Simulated devices are requested from XLA before anything imports JAX (the config file does)."""
    from absl import app

    devices = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), None)
    if devices is None and "--devices" in sys.argv[:-1]:
        devices = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices or 8}".strip()
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _flags()
    app.run(_main)


if __name__ == "__main__":
    cli()
