"""LAVIS's learning-rate schedule restated from its source (`LinearWarmupCosineLRScheduler.step(cur_epoch,
cur_step)`), as the reference the optimizer and train-step tests hold ours to."""
import math


def lavis_lr(cfg, iteration: int) -> float:
    """The learning rate LAVIS sets at `iteration` (one iteration = one micro-batch) for an OptimizerConfig."""
    epoch, step = divmod(iteration, cfg.iters_per_epoch)
    if epoch == 0:
        return min(cfg.init_lr, cfg.warmup_lr + (cfg.init_lr - cfg.warmup_lr) * step / max(cfg.warmup_steps, 1))
    return (cfg.init_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.max_epoch)) + cfg.min_lr
