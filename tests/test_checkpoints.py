"""Frozen-weight checkpoints: restored straight into their shardings, refused with names when they do not fit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vllama_jax.train.checkpoints import restore_params, save_params


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(0)
    params = {"llama_model": {"embed": rng.standard_normal((16, 8)).astype(np.float32),
                              "norm": rng.standard_normal(8).astype(np.float32)},
              "ln_vision": {"scale": rng.standard_normal(4).astype(np.float32)}}
    return save_params(tmp_path / "frozen", params), params


def abstract_of(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_restore_places_each_array_in_its_sharding(saved):
    path, params = saved
    mesh = jax.make_mesh((8,), ("fsdp",))
    shardings = jax.tree_util.tree_map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
    shardings["llama_model"]["embed"] = NamedSharding(mesh, PartitionSpec("fsdp", None))
    restored = restore_params(path, abstract_of(params), shardings)
    embed = restored["llama_model"]["embed"]
    assert embed.sharding == shardings["llama_model"]["embed"]
    assert {s.data.shape for s in embed.addressable_shards} == {(2, 8)}  # each device holds its 1/8 only
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_a_checkpoint_that_does_not_fit_is_refused_with_every_name(saved):
    path, params = saved
    wrong = abstract_of(params)
    wrong["llama_model"]["embed"] = jax.ShapeDtypeStruct((16, 9), jnp.float32)
    wrong["llama_model"]["norm"] = jax.ShapeDtypeStruct((8,), jnp.bfloat16)
    del wrong["ln_vision"]
    wrong["video_Qformer"] = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(ValueError) as err:
        restore_params(path, wrong)
    message = str(err.value)
    assert "['llama_model']['embed']: checkpoint has (16, 8) float32, the model wants (16, 9) float32" in message
    assert "['llama_model']['norm']" in message and "bfloat16" in message
    assert "missing ['video_Qformer']['w']" in message and "unexpected ['ln_vision']['scale']" in message


def test_refusals_for_missing_and_existing_directories(saved, tmp_path):
    path, params = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        restore_params(tmp_path / "nowhere", abstract_of(params))
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_params(path, params)
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="not a readable orbax checkpoint"):
        restore_params(tmp_path / "junk", abstract_of(params))
