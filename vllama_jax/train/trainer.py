"""The training loop, top to bottom: data → model → sharded state → steps → metrics and orbax checkpoints.

A run lives in one work directory (`checkpoints/`, `metrics.jsonl`, `tensorboard/`, `loss.png`, and for the
tiny default `data/`, `tokenizer/`, `frozen/`, `eval.json`). Starting again in the same directory resumes from
the newest complete checkpoint: the train state (trainable parameters, optimizer state, step, rng, skip count)
and the data iterator's position, so the resumed run computes exactly what the uninterrupted one would have.
SIGTERM (preemption) is caught from the start: during start-up the run stops before compiling (nothing new to
save), later it saves at the next step boundary; either way it returns normally. More than `train.max_nonfinite`
skipped (non-finite) steps stop the run with a checkpoint of the last good weights (skipped updates leave them
unchanged). A half-written checkpoint (orbax's temporary directory) is never resumed from and is removed at start.
Frozen weights are not checkpointed: they are read from `train.frozen_checkpoint` (or are random from the seed
when it is empty).
"""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

import flax.linen as nn
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vllama_jax import sharding
from vllama_jax.data.features import make_feature_dataset
from vllama_jax.data.pipeline import make_dataset, make_single_pass, reason_counts
from vllama_jax.data.prepare import shard_paths
from vllama_jax.data.tokenizer import load_tokenizer
from vllama_jax.train import reporting, tiny_default
from vllama_jax.train.checkpoints import restore_params
from vllama_jax.train.evaluate import caption_dataset, make_greedy_generate
from vllama_jax.train.feature_cache import check_feature_cache
from vllama_jax.train.flops import compiled_flops, scan_aware_flops
from vllama_jax.train.inputs import model_and_pipeline
from vllama_jax.train.sharded import ShardedStep, batch_shapes, build_sharded_step, unboxed
from vllama_jax.train.step import batch_keys, init_state, media_keys, split_params


def startup_summary(build: ShardedStep, cost: dict, peak: tuple[float, str]) -> list[str]:
    """What a run states before its first step: devices and mesh, parameter and optimizer-state sizes (frozen /
    trainable), how the largest arrays are sharded, per-device memory and FLOPs of the compiled step."""
    sizes = build.sizes()
    devices = jax.devices()
    lines = [
        f"{jax.process_count()} process(es), {len(devices)} {devices[0].device_kind} device(s), mesh {dict(build.mesh.shape)}",
        f"parameters: {sizes['trainable']:,} trainable ({sizes['trainable_bytes'] / 2**20:.1f} MiB), "
        f"{sizes['frozen']:,} frozen ({sizes['frozen_bytes'] / 2**20:.1f} MiB)"
        + (f"; not read by the step (cached features): {', '.join(sizes['not_read'])}" if sizes["not_read"] else ""),
        f"optimizer state: {sizes['optimizer_bytes'] / 2**20:.1f} MiB, for the trainable parameters only",
    ]
    arrays = {**build.abstract_arguments()[0].trainable, **build.abstract_frozen()}
    flat = jax.tree_util.tree_flatten_with_path(arrays)[0]
    for path, leaf in sorted(flat, key=lambda kv: -int(np.prod(kv[1].shape)))[:4]:
        lines.append(f"  sharding {jax.tree_util.keystr(path)} {tuple(leaf.shape)} {np.dtype(leaf.dtype).name}: {leaf.sharding.spec}")
    if "argument_bytes" in cost:
        lines.append("per device: " + ", ".join(f"{k.removesuffix('_bytes')} {cost[k] / 2**20:.1f} MiB" for k in
                                                ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes")))
    lines.append(f"step: {cost['flops'] / 1e9:.3f} GFLOP per device; peak {peak[0] / 1e12:.3g} TFLOP/s per device ({peak[1]})")
    return lines


def restore_trainable(source: str, abstract_state, state_shardings):
    """Trainable parameters, in their shardings, from a parameter checkpoint (`vllama-convert import --part
    trainable`) or from the newest checkpoint of another run's work directory."""
    directory = (Path(source) / "checkpoints").absolute()
    if not directory.is_dir():
        return restore_params(source, abstract_state.trainable, state_shardings.trainable)
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"train.init_trainable: no complete checkpoint in {directory}")
        abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_shardings)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored["state"].trainable


class _Preemption:
    """While entered, turns SIGTERM into a flag the run checks before compiling and at each step boundary. In a
    multi-process job the processes agree at every check (a one-integer all-gather), so a signal to any one of
    them stops all at the same step; JAX's own preemption notices (TPU maintenance events) count too."""

    def __enter__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *_):
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, *_):
        self.requested = True

    def agreed(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        anyone = bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))
        return anyone or multihost_utils.reached_preemption_sync_point(step)


def train(config, workdir: str | Path, log=print) -> dict:
    """Run (or resume) `config` in `workdir`; returns a summary whose "stop" is "done", "preempted" or (too many
    non-finite steps) "stopped: …". Metrics go to workdir/metrics.jsonl."""
    # SIGTERM is caught before the first line of start-up (data, weights, compilation can take minutes)
    with _Preemption() as preemption:
        return _train(config, Path(workdir), preemption, log)


def _train(config, workdir: Path, preemption: _Preemption, log) -> dict:
    log(f"training {config.name} in {workdir}")
    workdir.mkdir(parents=True, exist_ok=True)

    # data: media shards through the decoding pipeline, or the frozen towers' outputs from a feature cache
    if not config.data.shards and not config.data.feature_cache:  # the tiny default: its own clips, tokenizer, frozen LLM
        config = tiny_default.prepare(config, workdir, log)  # a copy, pointing at what it made (frozen/ among them)
    train_cfg = config.train
    tokenizer = load_tokenizer(config.data.tokenizer)
    branch, audio_source = train_cfg.branch, config.data.audio_source
    model_cfg, pipeline_cfg = model_and_pipeline(config, tokenizer)
    cached = bool(config.data.feature_cache)
    keys = batch_keys(branch, audio_source, cached)
    if cached:
        folders = config.data.feature_cache.split(",")
        check_feature_cache(folders, config, pipeline_cfg)
        shards = [path for folder in folders for path in shard_paths(folder.strip())]
        iterator = iter(make_feature_dataset(shards, keys, pipeline_cfg.batch_size, seed=config.seed))
    else:
        shards = [path for folder in config.data.shards.split(",") for path in shard_paths(folder.strip())]
        iterator = iter(make_dataset(shards, pipeline_cfg, tokenizer))

    # model and sharded state: one jitted step, its shardings derived from the logical-axis rules
    build = build_sharded_step(config, model_cfg, pipeline_cfg.text_length, cached=cached)
    model, mesh, rules = build.model, build.mesh, build.rules
    state_shardings, abstract_state = build.state_shardings, build.abstract_state
    batch_shardings = {k: v.sharding for k, v in build.batch.items()}
    optimizer = build.optimizer
    make_state_from = lambda trainable: init_state(trainable, optimizer, jax.random.PRNGKey(config.seed + 1))  # noqa: E731

    manager = ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=train_cfg.keep, enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True),  # half-written saves of a killed run
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        frozen = build.load_frozen(train_cfg.frozen_checkpoint, log=log)
        latest = manager.latest_step()  # only complete checkpoints count: orbax commits by an atomic rename
        if latest is None and train_cfg.init_trainable:  # e.g. stage 2 from stage 1: weights only, fresh optimizer
            state = jax.jit(make_state_from, out_shardings=state_shardings)(
                restore_trainable(train_cfg.init_trainable, unboxed(abstract_state), state_shardings))
            log(f"trainable weights from {train_cfg.init_trainable}")
        elif latest is None:
            state = build.initial_state()
        else:
            abstract = jax.tree_util.tree_map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed(abstract_state), state_shardings)
            restored = manager.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(iterator)))
            state = restored["state"]
            log(f"resumed from step {latest}")
        if preemption.agreed(int(state.step)):  # during start-up: the state is the checkpoint's (or new), no save
            manager.close()
            log("preempted")
            return {"steps": int(state.step), "skipped": int(state.skipped), "stop": "preempted"}

        # compiled ahead of time: the startup summary reports its per-device memory and FLOPs
        compiled_step = build.lower().compile()
        cost = reporting.step_cost(compiled_step)
        cost["flops"] = scan_aware_flops(model_cfg, lambda m: compiled_flops(  # XLA counts a scanned layer once
            build_sharded_step(config, m, pipeline_cfg.text_length, mesh=mesh, cached=cached).lower().compile()),
            unscanned=cost["flops"])
        peak = reporting.peak_flops(jax.devices()[0], train_cfg.peak_flops)
        is_main = jax.process_index() == 0
        if is_main:
            if cached:
                log(f"training from the frozen-feature cache {config.data.feature_cache}: the frozen towers do not run")
            summary_lines = startup_summary(build, cost, peak)
            for line in summary_lines:
                log(line)
            (workdir / "startup.json").write_text(json.dumps({  # what vllama-plan predicts for this step
                "mesh": dict(mesh.shape), "devices": [str(d) for d in jax.devices()], "global_batch": config.batch_size,
                "text_length": pipeline_cfg.text_length, "cost": cost, "peak_flops": peak[0], "sizes": build.sizes(),
                "summary": summary_lines}, indent=1) + "\n")

        start_step, stop_reason = int(state.step), "done"
        reporter = reporting.Reporter(workdir, enabled=is_main, total_steps=train_cfg.steps, start_step=start_step,
                                      log_every=train_cfg.log_every, log=log)
        tokens_per_batch = config.batch_size * pipeline_cfg.text_length
        try:
            for step in range(start_step, train_cfg.steps):
                started = time.perf_counter()
                batch = next(iterator)
                data_seconds = time.perf_counter() - started
                # each process contributes its own slice of the global batch, in process order
                inputs = {k: jax.make_array_from_process_local_data(batch_shardings[k], batch[k]) for k in keys}
                state, metrics = compiled_step(state, frozen, inputs)
                values = {k: v.item() for k, v in jax.device_get(metrics).items()}  # waits for the step
                seconds = time.perf_counter() - started
                reporter.step({
                    "step": step + 1, **values, **reason_counts(batch), "seconds": round(seconds, 4), "data_seconds": round(data_seconds, 4),
                    "examples_per_second": config.batch_size / seconds, "tokens_per_second": tokens_per_batch / seconds,
                    "mfu": cost["flops"] / seconds / peak[0],
                })
                too_many_nonfinite = int(state.skipped) > train_cfg.max_nonfinite  # the same on every process
                preempted = not too_many_nonfinite and preemption.agreed(step + 1)
                if ((step + 1) % train_cfg.checkpoint_every == 0 or preempted or too_many_nonfinite
                        or step + 1 == train_cfg.steps):
                    manager.save(step + 1, args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)))
                if too_many_nonfinite:
                    stop_reason = (f"stopped: {int(state.skipped)} non-finite steps (max_nonfinite={train_cfg.max_nonfinite}); "
                                   f"the checkpoint of step {step + 1} holds the last finite step's weights")
                    break
                if preempted:
                    stop_reason = "preempted"
                    break
        finally:
            reporter.close()
            manager.wait_until_finished()
            manager.close()
        log(stop_reason)
        if is_main and reporting.plot_loss(workdir / "metrics.jsonl", workdir / "loss.png"):
            log(f"loss curve: {workdir / 'loss.png'}; TensorBoard: tensorboard --logdir {workdir / 'tensorboard'}")
        summary = {"steps": int(state.step), "skipped": int(state.skipped), "stop": stop_reason}
        if config.eval.at_end and config.data.eval_shards and stop_reason == "done":
            towers = [k for k in split_params(build.boxed_params, build.trainable_names)[1] if k not in frozen]
            if towers:  # trained from cached features: captioning media needs the towers too
                frozen = {**frozen, **build.load_frozen(train_cfg.frozen_checkpoint, tuple(towers), log)}
            summary["eval"] = evaluate(config, model, {**frozen, **state.trainable}, tokenizer, pipeline_cfg, mesh, rules, workdir, log)
    return summary


def evaluate(config, model, params, tokenizer, pipeline_cfg, mesh, rules, workdir: Path, log=print) -> dict:
    """Greedy captions of the held-out shards (eval transform, uniform frames, one pass over every clip, the
    last batch filled up with masked rows), written with their references to workdir/eval.json; for the tiny
    default also scored per attribute."""
    batch_size = config.eval.batch_size
    # generation starts right after the prompt, at one position for the whole batch: the longest caption prompt
    # fills it exactly (the pipeline made room for that one), so held-out clips are all asked with it
    longest = max(pipeline_cfg.prompts, key=lambda p: len(tokenizer(p, add_special_tokens=False)["input_ids"]), default=None)
    eval_cfg = dataclasses.replace(pipeline_cfg, batch_size=batch_size // jax.process_count(), train=False,
                                   frame_sampling="uniform", num_epochs=1, worker_count=0,
                                   prompts=(longest,) if longest else ())
    batches = make_single_pass(shard_paths(config.data.eval_shards), eval_cfg, tokenizer)
    media = media_keys(config.train.branch, config.data.audio_source)
    shapes = batch_shapes(model.config, batch_size, eval_cfg.num_frames, eval_cfg.text_length, eval_cfg.clips_per_video)
    ndims = {**{k: len(shapes[k].shape) for k in (*media, "input_ids", "labels")}, "example_mask": 1}
    shardings = {k: sharding.batch_sharding(mesh, n, rules) for k, n in ndims.items()}
    prompt_length = pipeline_cfg.text_length - pipeline_cfg.max_txt_len  # stage 1's layout: [BOS] + placeholders
    generate = jax.jit(make_greedy_generate(model, prompt_length, config.eval.max_new_tokens, config.train.branch,
                                            config.data.audio_source))
    started = time.perf_counter()
    generated, reference = caption_dataset(generate, params, batches, tokenizer, shardings, prompt_length,
                                           config.data.end_sym, media)
    result = {"clips": len(reference), "seconds": round(time.perf_counter() - started, 2)}
    if config.eval.score == "shape_attributes":
        sounds = config.data.synthetic_sounds
        result["attribute_accuracy"] = tiny_default.attribute_accuracy(generated, reference, sounds)
        result["chance"] = tiny_default.chance(sounds)
        accuracy = result["attribute_accuracy"]
        log("held-out caption accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items())
            + " (chance: " + ", ".join(f"{k} {v:.0%}" for k, v in result["chance"].items()) + ")")
    if jax.process_index() == 0:
        samples = [{"generated": g, "reference": r} for g, r in zip(generated, reference)]
        (workdir / "eval.json").write_text(json.dumps({**result, "samples": samples}, indent=1) + "\n")
    return result
