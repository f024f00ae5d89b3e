"""The train step (`train/step.py`): trainable-only AdamW, accumulation, non-finite skip, clipping, sharding
equivalence, and what each branch reads."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vllama_jax import sharding
from vllama_jax.config import model_config
from vllama_jax.models.video_llama import VISUAL_TRAINABLE, Branch, VideoLlama, causal_lm_loss, count_params
from vllama_jax.sharded_model import split_params
from vllama_jax.testing.lavis_reference import lavis_lr
from vllama_jax.train.optimizer import OptimizerConfig, decay_mask, make_optimizer
from vllama_jax.train.step import init_state, make_train_step, video_llama_loss

OPT = OptimizerConfig(
    init_lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=4, iters_per_epoch=6, max_epoch=3, grad_clip=1.0
)


@pytest.fixture(scope="module")
def setup(tiny_config):
    cfg = dataclasses.replace(model_config(tiny_config), image_token_id=511)
    model = VideoLlama(cfg)
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((8, 2, 28, 28, 3)).astype(np.float32)
    ids = rng.integers(3, 500, (8, 12)).astype(np.int32)
    ids[:, 1:5] = 511
    batch = {
        "frames": frames,
        "input_ids": ids,
        "padding_mask": np.ones((8, 12), bool),
        "labels": np.where(np.arange(12) >= 5, ids, -100).astype(np.int32),
    }
    boxed = jax.jit(lambda: model.init(jax.random.key(0), frames, ids)["params"])()
    return model, boxed, batch


def run_steps(model, boxed, batch, opt_cfg=OPT, mesh=None, steps=3):
    optimizer = make_optimizer(opt_cfg)
    trainable, frozen = split_params(nn.unbox(boxed), VISUAL_TRAINABLE)
    step_fn = make_train_step(video_llama_loss(model, Branch()), optimizer, opt_cfg)
    if mesh is None:
        state = init_state(trainable, optimizer, jax.random.key(1))
        step = jax.jit(step_fn)
        history = []
        for _ in range(steps):
            state, metrics = step(state, frozen, batch)
            history.append(metrics)
        return state, frozen, history
    boxed_trainable, boxed_frozen = split_params(boxed, VISUAL_TRAINABLE)
    abstract_state = jax.eval_shape(lambda t: init_state(t, optimizer, jax.random.key(1)), boxed_trainable)
    state_sh = sharding.mesh_shardings(abstract_state, mesh)
    frozen_sh = sharding.mesh_shardings(boxed_frozen, mesh)
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        state = jax.jit(lambda t: init_state(t, optimizer, jax.random.key(1)), out_shardings=state_sh)(trainable)
        frozen = jax.device_put(frozen, frozen_sh)
        step = jax.jit(
            step_fn, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0
        )
        history = []
        for _ in range(steps):
            state, metrics = step(state, frozen, jax.device_put(batch, batch_sh))
            history.append(metrics)
    return state, frozen, history


@pytest.fixture(scope="module")
def reference(setup):
    return run_steps(*setup)


def test_loss_falls_and_only_trainable_parameters_move(setup, reference):
    model, boxed, batch = setup
    state, frozen, history = reference
    losses = [float(m["loss"]) for m in history]
    assert losses[-1] < losses[0]
    params = nn.unbox(boxed)
    moved = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree_util.tree_leaves({k: params[k] for k in VISUAL_TRAINABLE}),
            jax.tree_util.tree_leaves(state.trainable),
        )
    ]
    assert all(moved)
    # Adam moments exist for the trainable parameters only
    n_trainable = count_params(boxed, VISUAL_TRAINABLE)
    moments = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * n_trainable
    assert [round(float(m["learning_rate"]), 9) for m in history] == [round(lavis_lr(OPT, i), 9) for i in range(3)]


def test_frozen_parameters_bit_identical_after_training(setup):
    """Several sharded steps, each donating the state, leave the frozen arrays they read as they were: compared
    with host copies taken before training, and still alive (never donated)."""
    model, boxed, batch = setup
    frozen_before = jax.tree_util.tree_map(
        lambda x: np.array(x, copy=True), split_params(nn.unbox(boxed), VISUAL_TRAINABLE)[1]
    )
    state, frozen, history = run_steps(model, boxed, batch, mesh=sharding.make_mesh((2, 2, 2)), steps=4)
    assert all(bool(m["finite"]) for m in history) and int(state.step) == 4
    before, after = jax.tree_util.tree_leaves(frozen_before), jax.tree_util.tree_leaves(frozen)
    assert len(before) == len(after) > 50
    for a, b in zip(before, after):
        assert not b.is_deleted()
        np.testing.assert_array_equal(np.asarray(b), a)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_steps_match_one_device(setup, reference, shape):
    model, boxed, batch = setup
    ref_state, _, ref_history = reference
    state, _, history = run_steps(model, boxed, batch, mesh=sharding.make_mesh(shape))
    for a, b in zip(ref_history, history):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(ref_state.trainable), jax.tree_util.tree_leaves(state.trainable)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)


def test_gradient_accumulation_averages_micro_batch_losses(setup):
    model, boxed, batch = setup
    no_dropout = dataclasses.replace(
        model.config,
        video_qformer=dataclasses.replace(model.config.video_qformer, hidden_dropout=0.0, attention_dropout=0.0),
    )
    model = VideoLlama(no_dropout)
    accum = dataclasses.replace(OPT, grad_accum=2, grad_clip=0.0)
    state, _, (metrics,) = run_steps(model, boxed, batch, accum, steps=1)
    # the same update by hand: mean of the two half-batch mean losses, one AdamW step at LAVIS iteration 1
    trainable, frozen = split_params(nn.unbox(boxed), VISUAL_TRAINABLE)

    def loss(t):
        halves = [{k: v[i * 4 : (i + 1) * 4] for k, v in batch.items()} for i in range(2)]
        return (
            sum(
                causal_lm_loss(
                    model.apply({"params": {**frozen, **t}}, h["frames"], h["input_ids"], h["padding_mask"])[0],
                    h["labels"],
                )[0]
                for h in halves
            )
            / 2
        )

    grads = jax.grad(loss)(trainable)
    tx = optax.adamw(lavis_lr(accum, 1), b1=0.9, b2=0.999, eps=1e-8, weight_decay=accum.weight_decay, mask=decay_mask)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    expected = optax.apply_updates(trainable, updates)
    assert float(metrics["loss"]) == pytest.approx(float(loss(trainable)), abs=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.global_norm(grads)), rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(state.trainable)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0)


def test_images_batched_as_masked_frames_train_as_one_frame_images(setup):
    """The step reads the batch's frame_mask: images as 2 copies, frame 0 marked, give the loss and update of
    the same images as 1-frame clips (a batch without frame_mask has every frame real)."""
    model, boxed, batch = setup
    no_dropout = dataclasses.replace(
        model.config,
        video_qformer=dataclasses.replace(model.config.video_qformer, hidden_dropout=0.0, attention_dropout=0.0),
    )
    model = VideoLlama(no_dropout)
    images = batch["frames"][:, :1]
    one_frame = dict(batch, frames=images)
    copies = dict(batch, frames=np.repeat(images, 2, axis=1), frame_mask=np.array([[True, False]] * len(images)))
    state_one, _, (metrics_one,) = run_steps(model, boxed, one_frame, steps=1)
    state_copies, _, (metrics_copies,) = run_steps(model, boxed, copies, steps=1)
    _, _, (metrics_unmasked,) = run_steps(model, boxed, {k: v for k, v in copies.items() if k != "frame_mask"}, steps=1)
    assert float(metrics_copies["loss"]) == pytest.approx(float(metrics_one["loss"]), abs=1e-6)
    assert abs(float(metrics_unmasked["loss"]) - float(metrics_one["loss"])) > 1e-5  # the mask is what makes them equal
    for a, b in zip(jax.tree_util.tree_leaves(state_one.trainable), jax.tree_util.tree_leaves(state_copies.trainable)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0)


def test_model_inputs_send_the_frame_mask_where_the_frames_go():
    frames, mask, fbank = np.zeros((1, 2, 4, 4, 3)), np.array([[True, False]]), np.zeros((1, 2, 1, 8, 8))
    features, joint = np.zeros((1, 2, 3, 5)), np.zeros((1, 2, 6))
    batch = {"frames": frames, "frame_mask": mask, "audio": fbank, "video_features": features, "audio_features": joint}
    visual = Branch("visual").model_inputs(batch)
    assert visual["frames"] is frames and visual["frame_mask"] is mask
    from_frames = Branch("audio", "frames").model_inputs(
        batch
    )  # the audio stages: frames through ImageBind's vision tower
    assert (
        from_frames["audio"] is frames
        and from_frames["audio_modality"] == "vision"
        and from_frames["frame_mask"] is mask
    )
    from_fbank = Branch("audio", "fbank").model_inputs(batch)
    assert from_fbank["audio"] is fbank and from_fbank["frame_mask"] is None and from_fbank["frames"] is None
    both = Branch("audio_visual", "fbank").model_inputs(batch)
    assert (
        both["frames"] is frames
        and both["audio"] is fbank
        and both["frame_mask"] is mask
        and both["audio_modality"] == "audio"
    )
    cached = Branch("audio", "frames").model_inputs(batch, cached=True)
    assert cached["audio_features"] is joint and cached["frame_mask"] is mask and cached["audio_modality"] == "vision"
    assert Branch("visual").model_inputs(batch, cached=True)["video_features"] is features
    assert Branch("visual").model_inputs({"frames": frames})["frame_mask"] is None  # missing: every frame real
    assert "frame_mask" in Branch("visual").batch_keys() and "frame_mask" in Branch("audio", "frames").batch_keys(
        cached=True
    )
    assert "frame_mask" not in Branch("audio", "fbank").batch_keys() + Branch("audio", "fbank").batch_keys(cached=True)


def test_non_finite_loss_skips_the_update(setup):
    model, boxed, batch = setup
    bad = dict(batch, frames=np.full_like(batch["frames"], np.nan))
    state, _, (metrics,) = run_steps(model, boxed, bad, steps=1)
    assert not bool(metrics["finite"]) and int(state.skipped) == 1 and int(state.step) == 1
    trainable, _ = split_params(nn.unbox(boxed), VISUAL_TRAINABLE)
    for a, b in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(state.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_clipping_scales_gradients_to_the_clip_norm():
    """With grad_clip = c, AdamW sees g * c / |g| when the global norm |g| exceeds c, and g itself below it. Adam's
    first update hardly depends on the gradients' scale (m / sqrt(v)), so two updates of different norms are
    compared: their relative size is what clipping changes."""
    clip = 0.5
    params = {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
    rng = np.random.default_rng(0)
    grads = [
        jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) * scale, params)
        for scale in (10.0, 3.0)
    ]

    def train(grad_clip, gradients):
        tx = make_optimizer(dataclasses.replace(OPT, grad_clip=grad_clip))
        p, opt_state = params, tx.init(params)
        for g in gradients:
            updates, opt_state = tx.update(g, opt_state, p)
            p = optax.apply_updates(p, updates)
        return jax.tree_util.tree_leaves(p)

    to_clip_norm = [jax.tree_util.tree_map(lambda x, g=g: x * clip / optax.global_norm(g), g) for g in grads]
    assert all(float(optax.global_norm(g)) > 2 * clip for g in grads)
    for a, b in zip(train(clip, grads), train(0.0, to_clip_norm)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    unclipped = train(0.0, grads)
    assert any(not np.allclose(a, b, rtol=1e-3) for a, b in zip(train(clip, grads), unclipped))  # the test can tell
    small = [jax.tree_util.tree_map(lambda x: x * 0.2 * clip / optax.global_norm(grads[0]), g) for g in grads]
    for a, b in zip(train(clip, small), train(0.0, small)):  # below the clip norm: unchanged
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_optimizer_decays_weight_matrices_only():
    cfg = dataclasses.replace(OPT, weight_decay=0.5, grad_clip=0.0)
    tx = make_optimizer(cfg)
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2), "scale": jnp.ones(2)}
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["kernel"]), -cfg.init_lr * 0.5, rtol=1e-6)
    assert not np.asarray(updates["bias"]).any() and not np.asarray(updates["scale"]).any()
