"""The training loop, top to bottom: data → model → sharded state → steps → metrics and orbax checkpoints.

A run lives in one work directory (`checkpoints/`, `metrics.jsonl`, and for the tiny default `data/` and
`tokenizer/`). Starting again in the same directory resumes from the newest complete checkpoint: the train
state (trainable parameters, optimizer state, step, rng, skip count) and the data iterator's position, so the
resumed run computes exactly what the uninterrupted one would have. SIGTERM (preemption) saves at the next step
boundary and returns normally. Frozen weights are not checkpointed: they come from their own source (today the
config's seed; a converted checkpoint once `vllama-convert` lands).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from pathlib import Path

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vllama_jax import sharding
from vllama_jax.config import model_config
from vllama_jax.constants import IMAGE_PLACEHOLDER
from vllama_jax.data.pipeline import PipelineConfig, make_dataset, reason_counts
from vllama_jax.data.prepare import shard_paths
from vllama_jax.data.synthetic import synthetic_caption_data
from vllama_jax.data.tokenizer import load_tokenizer
from vllama_jax.models.video_llama import VISUAL_TRAINABLE, VideoLlama
from vllama_jax.train.optimizer import OptimizerConfig, make_optimizer
from vllama_jax.train.step import init_state, make_train_step, split_params

MODEL_INPUTS = ("frames", "input_ids", "padding_mask", "labels")
def startup_summary(mesh, boxed_params, abstract_state) -> list[str]:
    """What a run states before its first step: devices, mesh, parameter and optimizer-state sizes."""
    def size(tree):
        leaves = jax.tree_util.tree_leaves(nn.unbox(tree))
        return sum(int(np.prod(x.shape)) for x in leaves), sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)

    trainable, frozen = split_params(boxed_params, VISUAL_TRAINABLE)
    (n_train, b_train), (n_frozen, b_frozen) = size(trainable), size(frozen)
    _, b_opt = size(abstract_state.opt_state)
    devices = jax.devices()
    return [
        f"{jax.process_count()} process(es), {len(devices)} {devices[0].platform} device(s), mesh {dict(mesh.shape)}",
        f"parameters: {n_train:,} trainable ({b_train / 2**20:.1f} MiB), {n_frozen:,} frozen ({b_frozen / 2**20:.1f} MiB)",
        f"optimizer state: {b_opt / 2**20:.1f} MiB, for the trainable parameters only",
    ]


class _Preemption:
    """Turns SIGTERM into a flag the loop checks at each step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train(config, workdir: str | Path, log=print) -> dict:
    """Run (or resume) `config` in `workdir`; returns a summary. Metrics go to workdir/metrics.jsonl."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train_cfg, opt_cfg = config.train, OptimizerConfig(**config.optimizer.to_dict())

    # data
    if config.data.shards:
        shards, tokenizer = shard_paths(config.data.shards), load_tokenizer(config.data.tokenizer)
    else:  # made by process 0 in the (shared) work directory, then read by all
        if jax.process_index() == 0:
            synthetic_caption_data(workdir, config.data.synthetic_clips, config.model.llm.vocab_size)
        multihost_utils.sync_global_devices("synthetic data written")
        shards, tokenizer = synthetic_caption_data(workdir, config.data.synthetic_clips, config.model.llm.vocab_size)
    model_cfg = dataclasses.replace(model_config(config), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))
    pipeline_cfg = PipelineConfig(
        batch_size=config.batch_size // jax.process_count(),
        image_size=model_cfg.vision.image_size,
        num_frames=config.data.num_frames,
        frame_sampling=config.data.frame_sampling,
        num_soft_tokens=model_cfg.num_video_query_tokens,
        image_token_id=model_cfg.image_token_id,
        text_length=1 + model_cfg.num_video_query_tokens + config.data.max_txt_len,
        max_txt_len=config.data.max_txt_len,
        end_sym=config.data.end_sym,
        seed=config.seed,
        worker_count=config.data.get("worker_count", 0),
    )
    iterator = iter(make_dataset(shards, pipeline_cfg, tokenizer))

    # model and sharded state
    model = VideoLlama(model_cfg)
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = [tuple(r) for r in config.logical_axis_rules]
    size = pipeline_cfg.image_size
    sample = {  # one example's shapes, as the pipeline makes them
        "frames": jnp.zeros((1, pipeline_cfg.num_frames, size, size, 3), jnp.float32),
        "input_ids": jnp.zeros((1, pipeline_cfg.text_length), jnp.int32),
    }
    sample["padding_mask"] = sample["labels"] = sample["input_ids"]
    init = lambda: model.init(jax.random.PRNGKey(config.seed), sample["frames"], sample["input_ids"])["params"]  # noqa: E731
    boxed = jax.eval_shape(init)
    boxed_trainable, boxed_frozen = split_params(boxed, VISUAL_TRAINABLE)
    optimizer = make_optimizer(opt_cfg)
    make_state = lambda params: init_state(split_params(params, VISUAL_TRAINABLE)[0], optimizer, jax.random.PRNGKey(config.seed + 1))  # noqa: E731
    abstract_state = jax.eval_shape(lambda t: init_state(t, optimizer, jax.random.PRNGKey(0)), boxed_trainable)
    state_shardings = sharding.mesh_shardings(abstract_state, mesh, rules)
    frozen_shardings = sharding.mesh_shardings(boxed_frozen, mesh, rules)
    batch_shardings = {k: sharding.batch_sharding(mesh, sample[k].ndim, rules) for k in MODEL_INPUTS}
    step_fn = jax.jit(
        make_train_step(model, optimizer, opt_cfg),
        in_shardings=(state_shardings, frozen_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )

    if jax.process_index() == 0:
        for line in startup_summary(mesh, boxed, abstract_state):
            log(line)
    manager = ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=train_cfg.keep, enable_async_checkpointing=True),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.jit(lambda: nn.unbox(init()), out_shardings=sharding.mesh_shardings(boxed, mesh, rules))()
        frozen = split_params(params, VISUAL_TRAINABLE)[1]
        latest = manager.latest_step()  # only complete checkpoints count: orbax commits by an atomic rename
        if latest is None:
            state = jax.jit(make_state, out_shardings=state_shardings)(params)
        else:
            abstract = jax.tree_util.tree_map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                jax.eval_shape(make_state, params), state_shardings,
            )
            restored = manager.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(iterator)))
            state = restored["state"]
            log(f"resumed from step {latest}")
        del params

        preemption = _Preemption()
        is_main = jax.process_index() == 0
        start_step, stop_reason = int(state.step), "done"
        try:
            with open(workdir / "metrics.jsonl", "a") if is_main else contextlib.nullcontext() as metrics_file:
                for step in range(start_step, train_cfg.steps):
                    batch = next(iterator)
                    started = time.perf_counter()
                    # each process contributes its own slice of the global batch, in process order
                    inputs = {k: jax.make_array_from_process_local_data(batch_shardings[k], batch[k]) for k in MODEL_INPUTS}
                    state, metrics = step_fn(state, frozen, inputs)
                    values = {k: v.item() for k, v in jax.device_get(metrics).items()}  # waits for the step
                    record = {"step": step + 1, **values, **reason_counts(batch), "seconds": round(time.perf_counter() - started, 4)}
                    if metrics_file:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    if is_main and step % train_cfg.log_every == 0:
                        log(f"step {step + 1}: loss {record['loss']:.4f} lr {record['learning_rate']:.2e}")
                    if int(state.skipped) > train_cfg.max_nonfinite:
                        stop_reason = f"stopped: {int(state.skipped)} non-finite steps (max_nonfinite={train_cfg.max_nonfinite})"
                        break
                    preempted = preemption.requested if jax.process_count() == 1 else multihost_utils.reached_preemption_sync_point(step + 1)
                    if (step + 1) % train_cfg.checkpoint_every == 0 or preempted or step + 1 == train_cfg.steps:
                        manager.save(step + 1, args=ocp.args.Composite(
                            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)))
                    if preempted:
                        stop_reason = "preempted"
                        break
        finally:
            preemption.restore()
            manager.wait_until_finished()
            manager.close()
    log(stop_reason)
    return {"steps": int(state.step), "skipped": int(state.skipped), "stop": stop_reason}
