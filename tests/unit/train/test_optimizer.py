"""The original recipe's optimizer (`train/optimizer.py`): LAVIS's warmup-cosine schedule, weight decay on weight
matrices only."""

import jax.numpy as jnp
import pytest

from vllama_jax.testing.lavis_reference import lavis_lr
from vllama_jax.train.optimizer import OptimizerConfig, decay_mask, lavis_warmup_cosine

OPT = OptimizerConfig(
    init_lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=4, iters_per_epoch=6, max_epoch=3, grad_clip=1.0
)


def test_schedule_matches_lavis():
    schedule = lavis_warmup_cosine(OPT)
    for i in range(20):
        assert float(schedule(i)) == pytest.approx(lavis_lr(OPT, i), rel=1e-6), i


def test_weight_decay_mask():
    params = {
        "llama_proj": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
        "video_Qformer": {
            "query": {"kernel": jnp.zeros((3, 2, 2)), "bias": jnp.zeros((2, 2))},
            "ln": {"scale": jnp.zeros(3)},
        },
        "video_query_tokens": jnp.zeros((1, 4, 3)),
    }
    mask = decay_mask(params)
    assert mask["llama_proj"] == {"kernel": True, "bias": False}
    assert (
        mask["video_Qformer"]["query"] == {"kernel": True, "bias": False} and not mask["video_Qformer"]["ln"]["scale"]
    )
    assert mask["video_query_tokens"]
