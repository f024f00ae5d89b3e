"""The training loop as a recipe: inputs → restore or initialise → start-up report → steps → held-out evaluation.

A run lives in one work directory (`checkpoints/`, `metrics.jsonl`, `tensorboard/`, `loss.png`, `startup.json`,
`eval.json`). Starting again in the same directory resumes from the newest complete checkpoint: the train state
and the data iterator's position, so the resumed run computes exactly what the uninterrupted one would have
(`checkpoints.Checkpointer`). SIGTERM (preemption) is caught from the start: during start-up the run stops before
compiling (nothing new to save), later it saves at the next step boundary; either way it returns normally. More
than `train.max_nonfinite` skipped (non-finite) steps stop the run with a checkpoint of the last good weights
(skipped updates leave them unchanged). Frozen weights are not checkpointed: they are read from
`train.frozen_checkpoint` (or are random from the seed when it is empty).
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from vllama_jax.checkpoints import Checkpointer
from vllama_jax.data.pipeline import reason_counts
from vllama_jax.data.tokenizer import load_tokenizer
from vllama_jax.train import evaluate, inputs, reporting
from vllama_jax.train.sharded import build_sharded_step, step_flops


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
    train_cfg = config.train

    # inputs: the tokenizer, the model and pipeline settings, the batches (media or cached features)
    tokenizer = load_tokenizer(config.data.tokenizer)
    model_cfg, pipeline_cfg = inputs.model_and_pipeline(config, tokenizer)
    batches = inputs.train_batches(config, model_cfg, pipeline_cfg, tokenizer)
    step = build_sharded_step(config, model_cfg, pipeline_cfg.text_length)
    model = step.model

    with model.on_mesh(), Checkpointer(workdir, every=train_cfg.checkpoint_every, keep=train_cfg.keep,
                                       total_steps=train_cfg.steps) as checkpointer:
        # restore or initialise: frozen weights from their checkpoint, the train state from the run's own
        frozen = step.load_frozen(train_cfg.frozen_checkpoint, log=log)
        state = checkpointer.restore_or_init(step.abstract_state_with_shardings(), batches, fresh=step.initial_state,
                                             from_trainable=step.state_from_trainable,
                                             init_trainable=train_cfg.init_trainable, log=log)
        if preemption.agreed(int(state.step)):  # during start-up: the state is the checkpoint's (or new), no save
            log("preempted")
            return {"steps": int(state.step), "skipped": int(state.skipped), "stop": "preempted"}

        # start-up report: the step compiled ahead of time, its per-device memory and FLOPs
        compiled = step.lower().compile()
        cost = reporting.step_cost(compiled)
        cost["flops"] = step_flops(config, model_cfg, pipeline_cfg.text_length, mesh=model.mesh,
                                   cached=step.cached, unscanned=cost["flops"])
        peak = reporting.peak_flops(jax.devices()[0], train_cfg.peak_flops)
        is_main = jax.process_index() == 0
        if is_main:
            if step.cached:
                log(f"training from the frozen-feature cache {config.data.feature_cache}: the frozen towers do not run")
            reporting.startup(step, cost, peak, workdir=workdir, global_batch=config.batch_size,
                              text_length=pipeline_cfg.text_length, log=log)

        # the loop
        reporter = reporting.Reporter(workdir, enabled=is_main, total_steps=train_cfg.steps,
                                      start_step=int(state.step), log_every=train_cfg.log_every, log=log)
        shardings = {k: v.sharding for k, v in step.batch.items()}
        tokens_per_batch = config.batch_size * pipeline_cfg.text_length
        stop = "done"
        try:
            for n in range(int(state.step), train_cfg.steps):
                started = time.perf_counter()
                batch = next(batches)
                data_seconds = time.perf_counter() - started
                # each process contributes its own slice of the global batch, in process order
                arrays = {k: jax.make_array_from_process_local_data(shardings[k], batch[k]) for k in shardings}
                state, metrics = compiled(state, frozen, arrays)
                values = {k: v.item() for k, v in jax.device_get(metrics).items()}  # waits for the step
                seconds = time.perf_counter() - started
                reporter.step({
                    "step": n + 1, **values, **reason_counts(batch), "seconds": round(seconds, 4),
                    "data_seconds": round(data_seconds, 4), "examples_per_second": config.batch_size / seconds,
                    "tokens_per_second": tokens_per_batch / seconds, "mfu": cost["flops"] / seconds / peak[0],
                })
                too_many_nonfinite = int(state.skipped) > train_cfg.max_nonfinite  # the same on every process
                preempted = not too_many_nonfinite and preemption.agreed(n + 1)
                checkpointer.on_step(n + 1, state, batches, force=preempted or too_many_nonfinite)
                if too_many_nonfinite:
                    stop = (
                        f"stopped: {int(state.skipped)} non-finite steps (max_nonfinite={train_cfg.max_nonfinite}); "
                        f"the checkpoint of step {n + 1} holds the last finite step's weights"
                    )
                    break
                if preempted:
                    stop = "preempted"
                    break
        finally:
            reporter.close()
        log(stop)
        if is_main and reporting.plot_loss(workdir / "metrics.jsonl", workdir / "loss.png"):
            log(f"loss curve: {workdir / 'loss.png'}; TensorBoard: tensorboard --logdir {workdir / 'tensorboard'}")
        summary = {"steps": int(state.step), "skipped": int(state.skipped), "stop": stop}

        # held-out evaluation (trained from cached features: captioning media needs the towers too)
        if config.eval.at_end and config.data.eval_shards and stop == "done":
            towers = tuple(k for k in model.frozen_names if k not in frozen)
            frozen = {**frozen, **(model.load_frozen(train_cfg.frozen_checkpoint, towers, log) if towers else {})}
            summary["eval"] = evaluate.held_out(
                config,
                model.module,
                {**frozen, **state.trainable},
                tokenizer,
                pipeline_cfg,
                model.mesh,
                model.rules,
                workdir,
                log,
            )
    return summary
