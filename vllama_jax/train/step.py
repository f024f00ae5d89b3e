"""The train step: gradients for the trainable subtree only, accumulated over micro-batches, one AdamW update.

`TrainState` holds what changes (step, trainable parameters, optimizer state, rng, skipped-update count);
the frozen parameters are a separate argument, never differentiated, never in the optimizer state, never
donated. A step whose loss or gradients are not finite leaves parameters and optimizer state unchanged and
counts itself in `skipped`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from vllama_jax.models.video_llama import Branch, VideoLlama, causal_lm_loss
from vllama_jax.train.optimizer import OptimizerConfig, learning_rate_schedule


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array


def video_llama_loss(model: VideoLlama, branch: Branch, cached: bool = False) -> Callable:
    """Video-LLaMA's caption loss as a train step's `loss_fn(params, batch, dropout_rng) -> (loss, label tokens)`:
    `branch` says which batch arrays feed which branch (`Branch.model_inputs`); `cached`: the batch holds the frozen
    towers' outputs (the frozen-feature cache) instead of media."""

    def loss_fn(params, batch, rng):
        logits, _ = model.apply(
            {"params": params}, input_ids=batch["input_ids"], padding_mask=batch["padding_mask"],
            deterministic=False, rngs={"dropout": rng}, **branch.model_inputs(batch, cached),
        )
        return causal_lm_loss(logits, batch["labels"])

    return loss_fn


def init_state(trainable, optimizer: optax.GradientTransformation, rng) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        rng=rng,
        skipped=jnp.zeros((), jnp.int32),
    )


def _set_learning_rate(opt_state, lr):
    """Write lr into the inject_hyperparams state (alone, or last in a chain after clipping)."""
    if isinstance(opt_state, tuple) and not hasattr(opt_state, "hyperparams"):
        return (*opt_state[:-1], _set_learning_rate(opt_state[-1], lr))
    hyper = dict(opt_state.hyperparams, learning_rate=lr)
    return opt_state._replace(hyperparams=hyper)


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, cfg: OptimizerConfig) -> Callable:
    """train_step(state, frozen, batch) -> (state, metrics). `loss_fn(params, batch, dropout_rng) -> (loss, label
    tokens)` is the model family's loss (e.g. `video_llama_loss`) over every parameter, frozen and trainable. `batch`
    arrays lead with the global batch; with grad_accum = k it is split into k micro-batches (the original's
    accum_grad_iters), each a LAVIS iteration."""
    schedule = learning_rate_schedule(cfg)
    accum = cfg.grad_accum

    def micro_loss(trainable, frozen, micro, key):
        return loss_fn({**frozen, **trainable}, micro, key)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, frozen, batch):
        rng, step_rng = jax.random.split(state.rng)
        micro_batches = jax.tree_util.tree_map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

        def accumulate(carry, inputs):
            grads_sum, loss_sum, tokens = carry
            micro, key = inputs
            (loss, count), grads = grad_fn(state.trainable, frozen, micro, key)
            grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, grads)
            return (grads_sum, loss_sum + loss, tokens + count), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
        keys = jax.random.split(step_rng, accum)
        (grads, loss, tokens), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0), (micro_batches, keys))
        grads = jax.tree_util.tree_map(lambda g: g / accum, grads)  # mean of micro-batch mean losses
        loss = loss / accum
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        lr = schedule(state.step * accum + accum - 1)  # LAVIS sets lr every iteration; the update uses the last
        opt_state = _set_learning_rate(state.opt_state, lr)
        updates, new_opt_state = optimizer.update(grads, opt_state, state.trainable)
        new_trainable = optax.apply_updates(state.trainable, updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            trainable=keep(new_trainable, state.trainable),
            opt_state=keep(new_opt_state, state.opt_state),
            rng=rng,
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {"loss": loss, "learning_rate": lr, "grad_norm": grad_norm, "tokens": tokens, "finite": finite}
        return new_state, metrics

    return train_step
