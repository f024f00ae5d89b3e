"""The tiny model sharded over 8 simulated CPU devices by the rules table alone gives the 1-device result."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from vllama_jax import sharding
from vllama_jax.config import model_config
from vllama_jax.models.video_llama import VideoLlama, causal_lm_loss


@pytest.fixture(scope="module")
def setup(tiny_config):
    cfg = dataclasses.replace(model_config(tiny_config), image_token_id=511)
    model = VideoLlama(cfg)
    rng = np.random.default_rng(0)
    batch = 8
    frames = rng.standard_normal((batch, 2, 28, 28, 3)).astype(np.float32)
    ids = rng.integers(3, 500, (batch, 12)).astype(np.int32)
    ids[:, 1:5] = 511  # four soft tokens
    labels = np.where(np.arange(12) >= 5, ids, -100).astype(np.int32)
    boxed = model.init(jax.random.key(0), frames, ids)["params"]
    params = nn.unbox(boxed)

    def loss_fn(params, frames, ids, labels):
        logits, _ = model.apply({"params": params}, frames, ids)
        return causal_lm_loss(logits, labels)[0], logits

    reference = jax.jit(loss_fn)(params, frames, ids, labels)
    return model, boxed, params, (frames, ids, labels), loss_fn, reference


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_forward_matches_single_device(setup, shape):
    model, boxed, params, inputs, loss_fn, (ref_loss, ref_logits) = setup
    mesh = sharding.make_mesh(shape)
    param_shardings = sharding.mesh_shardings(boxed, mesh)
    input_shardings = tuple(sharding.batch_sharding(mesh, x.ndim) for x in inputs)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        sharded_params = jax.device_put(params, param_shardings)
        sharded_inputs = jax.device_put(inputs, input_shardings)
        loss, logits = jax.jit(loss_fn, in_shardings=(param_shardings, *input_shardings))(
            sharded_params, *sharded_inputs
        )
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=0)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5
    # the weights really are split: the LM head over fsdp x tensor, the batch over data x fsdp
    head = sharded_params["llama_model"]["lm_head"]["kernel"]
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    assert head.addressable_shards[0].data.shape == (64 // fsdp, 512 // tensor)
    assert logits.sharding.shard_shape(logits.shape)[0] == 8 // (mesh.shape["data"] * fsdp)


def test_rules_map_logical_names(setup):
    _, boxed, *_ = setup
    mesh = sharding.make_mesh((2, 2, 2))
    specs = sharding.mesh_shardings(boxed, mesh)
    q = specs["llama_model"]["decoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"].spec
    assert q == PartitionSpec("fsdp", "tensor", None)
    o = specs["llama_model"]["decoder"]["layers_0"]["self_attn"]["o_proj"]["kernel"].spec
    assert o == PartitionSpec("tensor", None, "fsdp")
    # a dimension the mesh does not divide is replicated rather than rejected (pos_embed length 5)
    assert specs["visual_encoder"]["pos_embed"].spec == PartitionSpec(None, None, "fsdp")
    assert specs["video_query_tokens"].spec == PartitionSpec(None, None, "fsdp")


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh((3, 2, 1))
    assert dict(sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1}).shape) == {"data": 4, "fsdp": 2, "tensor": 1}


def test_make_mesh_takes_jax_make_mesh_device_order(monkeypatch):
    """The devices are laid out by jax.make_mesh (topology-aware on TPU and GPU). CPU devices have no topology,
    so one is simulated: a jax.make_mesh that orders its devices in reverse."""
    real_make_mesh = jax.make_mesh

    def reversed_topology(axis_shapes, axis_names, axis_types=None, *, devices=None):
        return real_make_mesh(axis_shapes, axis_names, axis_types, devices=list(devices)[::-1])

    monkeypatch.setattr(jax, "make_mesh", reversed_topology)
    devices = jax.devices()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    assert [d.id for d in mesh.devices.flat] == [d.id for d in devices[::-1]]
    subset = sharding.make_mesh((2, 1, 1), devices[2:4])  # explicit devices, as the planner passes them
    assert [d.id for d in subset.devices.flat] == [devices[3].id, devices[2].id]
    # Auto axes (jax.make_mesh's default is Explicit): shardings come from the rules and jit's in/out shardings
    assert mesh.axis_names == sharding.MESH_AXES and set(mesh.axis_types) == {AxisType.Auto}


def test_scanned_llm_shards_layers_axis_unsharded(tiny_config):
    cfg = dataclasses.replace(model_config(tiny_config).llm, scan_layers=True)
    from vllama_jax.models.llama import LlamaForCausalLM

    boxed = jax.eval_shape(lambda: LlamaForCausalLM(cfg).init(jax.random.key(0), jnp.zeros((2, 4), jnp.int32)))[
        "params"
    ]
    specs = sharding.mesh_shardings(boxed, sharding.make_mesh((2, 2, 2)))
    assert specs["decoder"]["layers"]["gate_proj"]["kernel"].spec == PartitionSpec(None, "fsdp", "tensor")


def test_every_parameter_names_its_axes(setup):
    _, boxed, *_ = setup
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) > 100
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
        assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)
