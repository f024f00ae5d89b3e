"""The frozen-feature cache (`vllama-cache`): the frozen towers run once over real shards, and a step from their
outputs computes the end-to-end step's loss and update; the trainer runs from a cache and refuses a wrong one."""
import flax.linen as nn
import grain
import jax
import numpy as np
import pytest

from vllama_jax.data.features import decode, make_feature_dataset, read_manifest
from vllama_jax.data.pipeline import make_single_pass
from vllama_jax.data.prepare import shard_paths
from vllama_jax.data.tokenizer import load_tokenizer
from vllama_jax.models.video_llama import FROZEN_TOWERS
from vllama_jax.train.feature_cache import reading_config, write_feature_cache
from vllama_jax.train.inputs import model_and_pipeline
from vllama_jax.train.sharded import build_sharded_step


@pytest.fixture(scope="module")
def world(small_world):
    """The CPU demo's small world (12 training clips, 8 held out), read at one row per simulated device."""
    config, workdir = small_world
    config = config.copy_and_resolve_references()
    config.batch_size = 8  # one row per simulated device
    return config, workdir


@pytest.fixture(scope="module")
def cache(world, tmp_path_factory):
    config, _ = world
    out = tmp_path_factory.mktemp("cache") / "features"
    lines = []
    manifest = write_feature_cache(config, out, records_per_shard=5, log=lines.append)
    return config, out, manifest, lines


def test_cache_holds_every_clip_with_the_pipelines_tokens(cache):
    config, out, manifest, lines = cache
    assert manifest["records"] == 12 and [s["records"] for s in manifest["shards"]] == [5, 5, 2]
    assert read_manifest(out)["layout"]["shapes"]["video_features"] == [4, 4, 32]  # frames, queries, Q-Former width
    assert any("12 examples" in line for line in lines)
    # records are the usable examples of one pass in shard order (the second batch's 4 padding rows are not
    # written); their tokens are the pipeline's own
    tokenizer = load_tokenizer(config.data.tokenizer)
    _, pipeline_cfg = model_and_pipeline(config, tokenizer)
    assert (
        pipeline_cfg.crop_scale == (0.9, 1.0) == tuple(config.data.crop_scale)
    )  # the CPU demo's (configs/tiny_shapes.py)
    assert reading_config(pipeline_cfg, augment=True).crop_scale == (0.9, 1.0)
    batches = list(make_single_pass(shard_paths(config.data.shards), reading_config(pipeline_cfg), tokenizer))
    assert [int(b["example_mask"].sum()) for b in batches] == [8, 4]
    records = [decode(r)[1] for r in grain.sources.ArrayRecordDataSource(shard_paths(out))]
    ids = np.concatenate([b["input_ids"][b["example_mask"]] for b in batches])
    assert np.array_equal(np.stack([r["input_ids"] for r in records]), ids)


def test_a_step_from_cached_features_equals_the_end_to_end_step(cache):
    """Same media, same rng: the cached step's loss, gradient norm and updated glue equal the end-to-end step's,
    with the clips' own frame masks (stored in the cache) and with two rows' masked as images' would be."""
    config, out, _, _ = cache
    tokenizer = load_tokenizer(config.data.tokenizer)
    model_cfg, pipeline_cfg = model_and_pipeline(config, tokenizer)
    batch = next(iter(make_single_pass(shard_paths(config.data.shards), reading_config(pipeline_cfg), tokenizer)))
    records = [decode(r)[1] for r in grain.sources.ArrayRecordDataSource(shard_paths(out))][: len(batch["input_ids"])]
    cached_batch = {
        "video_features": np.stack([r["video_features"] for r in records]).astype(np.float32),
        **{k: np.stack([r[k] for r in records]) for k in ("frame_mask", "input_ids", "padding_mask", "labels")},
    }
    assert cached_batch["frame_mask"].shape == (8, 4) and cached_batch["frame_mask"].all()  # videos: every frame real
    image_rows = np.ones((8, 4), bool)
    image_rows[:2, 1:] = False

    results = {}
    for cached in (False, True):
        build = build_sharded_step(config, model_cfg, pipeline_cfg.text_length, cached=cached)
        with jax.set_mesh(build.mesh), nn.logical_axis_rules(build.rules):
            frozen = build.load_frozen(config.train.frozen_checkpoint)
            for masked in (False, True):
                state = build.initial_state()
                inputs = dict(cached_batch if cached else batch, **({"frame_mask": image_rows} if masked else {}))
                state, metrics = build.step_fn(state, frozen, {k: inputs[k] for k in build.batch})
                results[cached, masked] = jax.device_get((metrics, state.trainable))
        if cached:
            assert not set(FROZEN_TOWERS) & set(frozen), "a cached step must not read the towers"
    for masked in (False, True):
        (m_e2e, p_e2e), (m_cached, p_cached) = results[False, masked], results[True, masked]
        print(f"[feature cache] loss end-to-end {m_e2e['loss']:.8f} cached {m_cached['loss']:.8f} (masked={masked})")
        assert abs(float(m_e2e["loss"]) - float(m_cached["loss"])) <= 1e-6
        assert abs(float(m_e2e["grad_norm"]) - float(m_cached["grad_norm"])) <= 1e-5 * float(m_e2e["grad_norm"])
        for a, b in zip(jax.tree_util.tree_leaves(p_e2e), jax.tree_util.tree_leaves(p_cached)):
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert abs(float(results[True, True][0]["loss"]) - float(results[True, False][0]["loss"])) > 1e-6  # it is read


def test_the_trainer_runs_from_the_cache_and_refuses_another_layout(cache, tmp_path):
    from vllama_jax.train.trainer import train

    config, out, _, _ = cache
    config = config.copy_and_resolve_references()
    config.data.feature_cache = str(out)
    config.train.update(steps=3, checkpoint_every=3, log_every=1)
    config.eval.at_end = True
    lines = []
    summary = train(config, tmp_path / "run", log=lines.append)
    assert summary["steps"] == 3 and summary["skipped"] == 0
    assert any("frozen-feature cache" in line for line in lines)
    assert summary["eval"]["clips"] == 8  # held-out captions from media: the towers are loaded for them

    other = config.copy_and_resolve_references()
    other.data.num_frames = 2
    with pytest.raises(ValueError, match="rebuild it with vllama-cache"):
        train(other, tmp_path / "other", log=lambda *_: None)


def test_feature_batches_resume_where_they_stopped(cache):
    _, out, _, _ = cache
    keys = ("video_features", "frame_mask", "input_ids", "padding_mask", "labels")
    it = iter(make_feature_dataset(shard_paths(out), keys, 4, seed=3))
    next(it)
    saved = it.get_state()
    expected = next(it)
    again = iter(make_feature_dataset(shard_paths(out), keys, 4, seed=3))
    again.set_state(saved)
    got = next(again)
    for key in keys:
        assert np.array_equal(got[key], expected[key])
    assert got["video_features"].dtype == np.float32 and got["example_mask"].all()
