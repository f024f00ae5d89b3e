"""The original recipe's optimizer: AdamW (betas 0.9 / beta2, decoupled weight decay on weight matrices only)
under LAVIS's `linear_warmup_cosine_lr` schedule, with optional global-norm clipping.

LAVIS's schedule is per iteration in epoch 0 (linear from warmup_lr to init_lr over warmup_steps, then flat)
and per *epoch* afterwards (cosine from init_lr to min_lr over max_epoch, constant within an epoch).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    init_lr: float = 1e-4
    min_lr: float = 8e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 2500
    iters_per_epoch: int = 2500
    max_epoch: int = 5
    weight_decay: float = 0.05
    beta2: float = 0.999
    grad_clip: float = 0.0  # 0 = no clipping (the original recipes do not clip)
    grad_accum: int = 1
    # "lavis_warmup_cosine" (Video-LLaMA's LAVIS schedule) or "warmup_cosine" (Video-LLaVA's transformers Trainer:
    # linear 0 -> init_lr over warmup_steps, then cosine to 0 at iters_per_epoch * max_epoch; min/warmup_lr unused)
    schedule: str = "lavis_warmup_cosine"


def lavis_warmup_cosine(cfg: OptimizerConfig):
    """Learning rate at LAVIS iteration `i` (one iteration = one micro-batch)."""

    def schedule(iteration):
        iteration = jnp.asarray(iteration, jnp.float32)
        epoch = jnp.floor(iteration / cfg.iters_per_epoch)
        in_epoch = iteration - epoch * cfg.iters_per_epoch
        warm = jnp.minimum(
            cfg.init_lr, cfg.warmup_lr + (cfg.init_lr - cfg.warmup_lr) * in_epoch / max(cfg.warmup_steps, 1)
        )
        cosine = (cfg.init_lr - cfg.min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * epoch / cfg.max_epoch)) + cfg.min_lr
        return jnp.where(epoch == 0, warm, cosine)

    return schedule


def warmup_cosine(cfg: OptimizerConfig):
    """transformers' `get_cosine_schedule_with_warmup` at iteration `i` (one iteration = one micro-batch)."""
    total = cfg.iters_per_epoch * cfg.max_epoch

    def schedule(iteration):
        iteration = jnp.asarray(iteration, jnp.float32)
        warm = iteration / max(cfg.warmup_steps, 1)
        progress = (iteration - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
        cosine = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * progress)))
        return cfg.init_lr * jnp.where(iteration < cfg.warmup_steps, warm, cosine)

    return schedule


SCHEDULES = {"lavis_warmup_cosine": lavis_warmup_cosine, "warmup_cosine": warmup_cosine}


def learning_rate_schedule(cfg: OptimizerConfig):
    """The config's schedule (`cfg.schedule`, a key of SCHEDULES)."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule {cfg.schedule!r}: expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[cfg.schedule](cfg)


def decay_mask(params):
    """True where weight decay applies: as the original, not on biases nor on anything with fewer than 2
    dimensions (norm scales). Our per-head biases are 2-D but are still biases by name."""

    def decays(path, leaf):
        return leaf.ndim >= 2 and "bias" not in jax.tree_util.keystr(path)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW with an injectable learning rate (the train step sets it from the schedule every update)."""
    # mask is a function of the params, not a schedule: keep inject_hyperparams from calling it with the step
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=cfg.init_lr, b1=0.9, b2=cfg.beta2, eps=1e-8, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
