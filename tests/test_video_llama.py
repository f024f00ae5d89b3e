"""The assembled visual branch: splicing, the caption loss, scan/remat equivalence, dtypes, the full mapping."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vllama_jax.config import model_config
from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.convert.mapping import ConversionError
from vllama_jax.convert.video_llama import export_state_dict, load_state_dict, scanned_subtrees, video_llama_rules
from vllama_jax.models.video_llama import VideoLlama, causal_lm_loss, splice_soft_tokens

IMAGE_ID = 511


@pytest.fixture(scope="module")
def tiny(tiny_config):
    cfg = dataclasses.replace(model_config(tiny_config), image_token_id=IMAGE_ID)
    rng = np.random.default_rng(1)
    frames = rng.standard_normal((2, 3, 28, 28, 3)).astype(np.float32)
    ids = rng.integers(3, 500, (2, 10)).astype(np.int32)
    ids[:, 1:5] = IMAGE_ID
    labels = np.where(np.arange(10) >= 5, ids, IGNORE_INDEX)
    params = jax.jit(lambda: nn.unbox(VideoLlama(cfg).init(jax.random.key(0), frames, ids)["params"]))()
    return cfg, params, frames, ids, labels


def with_scan(cfg, scan, remat="none"):
    towers = {k: dataclasses.replace(getattr(cfg, k), scan_layers=scan, remat_policy=remat) for k in ("vision", "qformer", "video_qformer", "llm")}
    return dataclasses.replace(cfg, **towers)


def test_splice_places_soft_tokens_in_order():
    text = jnp.zeros((2, 6, 3))
    is_ph = jnp.array([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]], bool)
    soft = jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 3) + 1
    out = np.asarray(splice_soft_tokens(text, is_ph, soft))
    np.testing.assert_array_equal(out[0, 1:3], soft[0])
    np.testing.assert_array_equal(out[1, 3:5], soft[1])
    assert (out[0, [0, 3, 4, 5]] == 0).all() and (out[1, [0, 1, 2, 5]] == 0).all()


def test_llm_sees_soft_tokens_at_placeholders(tiny):
    cfg, params, frames, ids, _ = tiny
    model = VideoLlama(cfg)
    logits, soft = model.apply({"params": params}, frames, ids)
    # the same logits from the LLM alone, fed the spliced embeddings by hand
    embeds = np.array(model.apply({"params": params}, jnp.where(ids == IMAGE_ID, 0, ids), method=lambda m, i: m.llama_model.embed(i)))
    embeds[:, 1:5] = np.asarray(soft["video"])
    direct = model.apply({"params": params}, embeds, method=lambda m, e: m.llama_model(inputs_embeds=e))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(direct), atol=1e-6)
    # causal: other soft tokens change every position from the first soft token on, and nothing before it
    embeds[:, 1:5] = 0.0
    blank = model.apply({"params": params}, embeds, method=lambda m, e: m.llama_model(inputs_embeds=e))
    np.testing.assert_allclose(np.asarray(blank)[:, 0], np.asarray(logits)[:, 0], atol=1e-6)
    assert (np.abs(np.asarray(blank) - np.asarray(logits)).max(axis=-1)[:, 1:] > 1e-4).all()


def test_causal_lm_loss_matches_manual():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    labels = np.array([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 6, 0]])
    loss, count = causal_lm_loss(jnp.asarray(logits), jnp.asarray(labels))
    terms = []
    for b in range(2):
        for t in range(4):
            y = labels[b, t + 1]
            if y != IGNORE_INDEX:
                row = logits[b, t].astype(np.float64)
                terms.append(np.log(np.exp(row).sum()) - row[y])
    assert int(count) == len(terms) == 6
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-6)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_remat_give_the_same_loss_and_grads(tiny, remat):
    cfg, params, frames, ids, labels = tiny
    rules = video_llama_rules(cfg)
    scanned_cfg = with_scan(cfg, True, remat)
    scanned_model = VideoLlama(scanned_cfg)
    abstract = jax.eval_shape(lambda: scanned_model.init(jax.random.key(0), frames, ids)["params"])
    # move the same weights into the scanned layout through the original-key state dict
    scanned_params = load_state_dict(export_state_dict(params, rules), rules, abstract, scanned_subtrees(scanned_cfg))

    def loss(model, p):
        logits, _ = model.apply({"params": p}, frames, ids, deterministic=True)
        return causal_lm_loss(logits, labels)[0]

    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(VideoLlama(cfg), p)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(scanned_model, p)))(scanned_params)
    assert abs(float(l0) - float(l1)) < 1e-5
    g1_unscanned = export_state_dict(g1, rules, [p for p, _ in scanned_subtrees(scanned_cfg)])
    g0_flat = export_state_dict(g0, rules)
    for key in g0_flat:
        np.testing.assert_allclose(g1_unscanned[key], g0_flat[key], atol=2e-5, err_msg=key)


def test_bfloat16_compute_with_float32_params(tiny):
    cfg, params, frames, ids, _ = tiny
    bf = {k: dataclasses.replace(getattr(cfg, k), dtype="bfloat16") for k in ("vision", "qformer", "llm")}
    model = VideoLlama(dataclasses.replace(cfg, **bf))
    logits, soft = jax.jit(model.apply)({"params": params}, frames, ids)
    ref, _ = jax.jit(VideoLlama(cfg).apply)({"params": params}, frames, ids)
    assert logits.dtype == jnp.float32 and soft["video"].dtype == jnp.float32
    err = float(jnp.abs(logits - ref).max())
    assert 0 < err < 0.1, err  # bf16 rounding shows, but the result is the same model
    half = dataclasses.replace(cfg.llm, param_dtype="bfloat16", dtype="bfloat16")
    p = jax.eval_shape(lambda: VideoLlama(dataclasses.replace(cfg, llm=half)).init(jax.random.key(0), frames, ids)["params"])
    assert nn.unbox(p)["llama_model"]["lm_head"]["kernel"].dtype == jnp.bfloat16
    assert nn.unbox(p)["llama_proj"]["kernel"].dtype == jnp.float32


def test_video_qformer_dropout_only_when_training(tiny):
    cfg, params, frames, ids, _ = tiny
    model = VideoLlama(cfg)
    encode = lambda det, seed: model.apply(  # noqa: E731
        {"params": params}, frames, deterministic=det, rngs={"dropout": jax.random.key(seed)}, method=VideoLlama.encode_video
    )
    np.testing.assert_array_equal(np.asarray(encode(True, 0)), np.asarray(encode(True, 1)))
    assert float(jnp.abs(encode(False, 0) - encode(False, 1)).max()) > 1e-4


def test_an_image_batched_as_masked_frames_equals_the_image_as_one_frame(tiny):
    """SPEC §3: an image is a 1-frame video. Batched among videos as T copies with frame_mask [1, 0, …], the video
    Q-Former reads only frame 0's queries (frame position 0): the soft tokens of the image given as T = 1."""
    cfg, params, frames, ids, _ = tiny
    model = VideoLlama(cfg)
    encode = lambda x, **kw: np.asarray(model.apply({"params": params}, x, method=VideoLlama.encode_video, **kw))  # noqa: E731
    num_frames = frames.shape[1]
    image = frames[:, :1]
    copies = np.repeat(image, num_frames, axis=1)
    mask = np.zeros((2, num_frames), bool)
    mask[:, 0] = True
    one = encode(image)
    np.testing.assert_allclose(encode(copies, frame_mask=mask), one, atol=1e-6, rtol=0)
    assert np.abs(encode(copies) - one).max() > 1e-4  # unmasked, the copies and their positions change the tokens
    # a mixed batch: row 0 an image, row 1 a video (all frames real, the same as without a mask)
    mixed = np.stack([copies[0], frames[1]])
    mixed_mask = np.stack([mask[0], np.ones(num_frames, bool)])
    got = encode(mixed, frame_mask=mixed_mask)
    np.testing.assert_allclose(got[0], one[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got[1], encode(frames)[1], atol=1e-6, rtol=0)
    # the same from the frozen towers' cached outputs, and through the forward pass to the logits
    features = model.apply({"params": params}, copies, method=VideoLlama.frame_features)
    np.testing.assert_allclose(encode(None, features=features, frame_mask=mask), one, atol=1e-6, rtol=0)
    logits, _ = model.apply({"params": params}, copies, ids, frame_mask=mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model.apply({"params": params}, image, ids)[0]), atol=1e-5)
    with pytest.raises(ValueError, match=r"frame_mask has shape \(2, 2\), expected \(batch, frames\) = \(2, 3\)"):
        encode(copies, frame_mask=mask[:, :2])


def test_full_state_dict_round_trip_and_strictness(tiny):
    cfg, params, *_ = tiny
    rules = video_llama_rules(cfg)
    state = export_state_dict(params, rules)
    assert {k.split(".")[0] for k in state} == {
        "visual_encoder", "ln_vision", "Qformer", "query_tokens", "video_frame_position_embedding",
        "video_Qformer", "video_query_tokens", "llama_proj", "llama_model",
    }
    assert state["llama_proj.weight"].shape == (64, 32)  # torch Linear layout (out, in)
    assert state["visual_encoder.blocks.0.attn.qkv.weight"].shape == (3 * 48, 48)
    back = load_state_dict(state, rules, params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # keys dropped on purpose pass only when listed; anything else is named in the error
    extra = dict(state, **{"Qformer.cls.predictions.bias": np.zeros(3)})
    with pytest.raises(ConversionError, match="Qformer.cls.predictions.bias"):
        load_state_dict(extra, rules, params)
    from vllama_jax.convert.video_llama import UNUSED_KEYS

    load_state_dict(extra, rules, params, ignore=UNUSED_KEYS)
    # a tensor with the right element count in the wrong layout is refused, not silently scrambled
    for key in ("llama_proj.weight", "visual_encoder.patch_embed.proj.weight", "llama_model.model.layers.0.mlp.gate_proj.weight"):
        bad = dict(state)
        bad[key] = state[key].T.copy() if state[key].ndim == 2 else state[key].transpose(2, 3, 1, 0).copy()
        with pytest.raises(ConversionError, match=f"{key}: shape .*expected {tuple(state[key].shape)}".replace("(", r"\(").replace(")", r"\)")):
            load_state_dict(bad, rules, params)
    wrong = dict(state)
    wrong["llama_proj.bias"] = np.zeros(63, np.float32)
    with pytest.raises(ConversionError, match=r"llama_proj.bias: shape \(63,\)"):
        load_state_dict(wrong, rules, params)
