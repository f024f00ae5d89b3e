"""The train step: gradients for the trainable subtree only, accumulated over micro-batches, one AdamW update.

`TrainState` holds what changes (step, trainable parameters, optimizer state, rng, skipped-update count);
the frozen parameters are a separate argument, never differentiated, never in the optimizer state, never
donated. A step whose loss or gradients are not finite leaves parameters and optimizer state unchanged and
counts itself in `skipped`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from vllama_jax.models.video_llama import VideoLlama, causal_lm_loss
from vllama_jax.train.optimizer import OptimizerConfig, lavis_warmup_cosine


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array


def split_params(params: dict, trainable_names: tuple[str, ...]) -> tuple[dict, dict]:
    """(trainable, frozen) top-level subtrees of `params`; names must exist."""
    missing = [n for n in trainable_names if n not in params]
    if missing:
        raise KeyError(f"trainable subtrees {missing} are not in the model (top level: {sorted(params)})")
    trainable = {k: v for k, v in params.items() if k in trainable_names}
    frozen = {k: v for k, v in params.items() if k not in trainable_names}
    return trainable, frozen


# What each training branch reads from a batch (SPEC §3, §4): the visual stages feed the frames to the visual
# branch; the audio stages feed them through ImageBind's vision tower to the audio branch ("frames", the paper's
# way) or feed the clips' fbank to its audio tower ("fbank"); "audio_visual" (the tiny demo's variant with
# sound) trains both branches, frames to the visual one and fbank to the audio one.
BRANCHES = ("visual", "audio", "audio_visual")
AUDIO_SOURCES = ("frames", "fbank")


def model_inputs(batch: dict, branch: str, audio_source: str = "frames", cached: bool = False) -> dict:
    """Keyword arguments of `VideoLlama.encode` / `__call__` for `branch`, taken from a batch (of media, or of
    the frozen towers' cached outputs when `cached`). A batch without `frame_mask` has every frame real."""
    keys = media_keys(branch, audio_source, cached)  # validates the pair
    frames_to_audio = branch == "audio" and audio_source == "frames"
    inputs = {"frames": None, "audio_modality": "vision" if frames_to_audio else "audio",
              "frame_mask": batch.get("frame_mask") if "frame_mask" in keys else None}
    if cached:
        return {**inputs, **{k: batch[k] for k in keys if k != "frame_mask"}}
    if branch in ("visual", "audio_visual"):
        inputs["frames"] = batch["frames"]
    if branch in ("audio", "audio_visual"):
        inputs["audio"] = batch["frames"] if frames_to_audio else batch["audio"]
    return inputs


def media_keys(branch: str, audio_source: str = "frames", cached: bool = False) -> tuple[str, ...]:
    """The batch's media arrays (or, when `cached`, the frozen towers' outputs, named as `VideoLlama`'s
    arguments) a branch reads, with `frame_mask` wherever frames feed a branch (an image's copies masked)."""
    if branch not in BRANCHES or audio_source not in AUDIO_SOURCES:
        raise ValueError(f"branch {branch!r} / audio_source {audio_source!r}: expected {BRANCHES} / {AUDIO_SOURCES}")
    if branch == "audio_visual" and audio_source != "fbank":
        raise ValueError("branch 'audio_visual' reads the frames and the audio track: set data.audio_source='fbank'")
    if cached:
        return {"visual": ("video_features", "frame_mask"),
                "audio": ("audio_features", "frame_mask") if audio_source == "frames" else ("audio_features",),
                "audio_visual": ("video_features", "frame_mask", "audio_features")}[branch]
    if branch == "visual":
        return ("frames", "frame_mask")
    if branch == "audio":
        return ("audio",) if audio_source == "fbank" else ("frames", "frame_mask")
    return ("frames", "frame_mask", "audio")


def batch_keys(branch: str, audio_source: str = "frames", cached: bool = False) -> tuple[str, ...]:
    """The batch arrays a train step reads."""
    return (*media_keys(branch, audio_source, cached), "input_ids", "padding_mask", "labels")


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


def make_train_step(model: VideoLlama, optimizer: optax.GradientTransformation, cfg: OptimizerConfig,
                    branch: str = "visual", audio_source: str = "frames", cached: bool = False) -> Callable:
    """train_step(state, frozen, batch) -> (state, metrics). `batch` arrays lead with the global batch; with
    grad_accum = k it is split into k micro-batches (the original's accum_grad_iters), each a LAVIS iteration.
    `branch` / `audio_source` say which inputs feed which branch (`model_inputs`); `cached`: the batch holds the
    frozen towers' outputs (the frozen-feature cache) instead of media, and `frozen` need not hold the towers."""
    schedule = lavis_warmup_cosine(cfg)
    accum = cfg.grad_accum

    def micro_loss(trainable, frozen, micro, key):
        inputs = model_inputs(micro, branch, audio_source, cached)
        logits, _ = model.apply(
            {"params": {**frozen, **trainable}},
            input_ids=micro["input_ids"], padding_mask=micro["padding_mask"],
            deterministic=False, rngs={"dropout": key}, **inputs,
        )
        return causal_lm_loss(logits, micro["labels"])

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
