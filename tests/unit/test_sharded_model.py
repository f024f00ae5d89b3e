"""The model on a mesh (`sharded_model`): one object for every job, generic over the model family."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vllama_jax import checkpoints, sharded_model
from vllama_jax.config import model_config
from vllama_jax.models.video_llama import AUDIO_TRAINABLE, VISUAL_TRAINABLE
from vllama_jax.sharding import make_mesh


@pytest.fixture(scope="module")
def tiny(tiny_config):
    config = tiny_config.copy_and_resolve_references()
    config.mesh = {"data": 2, "fsdp": 4, "tensor": 1}
    return config, sharded_model.from_config(config, model_config(config))


def test_the_config_decides_mesh_and_trainable_subtrees(tiny, tiny_config):
    config, model = tiny
    assert dict(model.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert model.trainable_names == VISUAL_TRAINABLE and not set(model.frozen_names) & set(VISUAL_TRAINABLE)
    audio = tiny_config.copy_and_resolve_references()
    audio.model.equip_audio_branch, audio.train.branch = True, "audio"
    assert sharded_model.from_config(audio, model_config(audio)).trainable_names == AUDIO_TRAINABLE


def test_abstract_parameters_carry_their_shardings_and_random_ones_land_there(tiny):
    _, model = tiny
    abstract = model.abstract(["llama_model"])
    table = abstract["llama_model"]["embed_tokens"]["embedding"]
    assert table.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # (vocab, embed): embed over fsdp
    with model.on_mesh():
        params = model.random(["llama_model", "llama_proj"])
    assert set(params) == {"llama_model", "llama_proj"}
    real = params["llama_model"]["embed_tokens"]["embedding"]
    assert real.sharding == table.sharding and real.addressable_shards[0].data.shape == (512, 16)
    assert model.count(["llama_proj"]) == (32 * 64 + 64, (32 * 64 + 64) * 4)


def test_loaders_read_checkpoints_into_the_shardings(tiny, tmp_path):
    _, model = tiny
    with model.on_mesh():
        random = model.random()
    trainable, frozen = model.split(jax.device_get(random))
    checkpoints.save_params(tmp_path / "frozen", {**frozen, "extra": {"w": np.zeros(3, np.float32)}})
    checkpoints.save_params(tmp_path / "trainable", trainable)
    with model.on_mesh():
        loaded = model.load_frozen(str(tmp_path / "frozen"), ["llama_model"])  # the checkpoint may hold more
        weights = model.load_trainable(str(tmp_path / "trainable"))
    np.testing.assert_array_equal(
        loaded["llama_model"]["lm_head"]["kernel"], frozen["llama_model"]["lm_head"]["kernel"]
    )
    assert loaded["llama_model"]["lm_head"]["kernel"].sharding == model.shardings["llama_model"]["lm_head"]["kernel"]
    assert set(weights) == set(VISUAL_TRAINABLE)


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(
            8, name="encoder", kernel_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp"))
        )(x)
        return nn.Dense(
            2, name="head", kernel_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp", "embed"))
        )(x)


def test_any_family_plugs_in(tiny_config):
    """A family is a module, an init function and its trainable subtrees: nothing else is assumed."""
    module = Tiny()
    model = sharded_model.ShardedModel(
        module,
        lambda rng: module.init(rng, jnp.zeros((1, 4)))["params"],
        ("head",),
        make_mesh({"data": 1, "fsdp": 8, "tensor": 1}),
        [("embed", "fsdp"), ("mlp", None)],
    )
    assert model.frozen_names == ("encoder",)
    assert model.shardings["head"]["kernel"].spec == jax.sharding.PartitionSpec(None, None)  # 2 does not divide by 8
    assert model.shardings["encoder"]["kernel"].spec == jax.sharding.PartitionSpec(None, None)  # 4 neither
    with pytest.raises(KeyError, match="trainable subtrees"):
        dataclasses.replace(model, trainable_names=("decoder",))
    config = tiny_config.copy_and_resolve_references()
    config.family = "no_such_family"
    with pytest.raises(ValueError, match="unknown model family 'no_such_family'"):
        sharded_model.from_config(config, model_config(config))
