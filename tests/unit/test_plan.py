"""`vllama-plan`: the ahead-of-time plan of a step agrees with what a real run on simulated devices compiles and
holds; the largest-batch search; the decode step's sharded KV cache; the CLI on full-size shapes."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from vllama_jax import plan
from vllama_jax.sharding import make_mesh


def _device0_bytes(tree) -> int:
    """Bytes of a tree of real arrays that live on the first device."""
    device = jax.devices()[0]
    return sum(
        s.data.nbytes for x in jax.tree_util.tree_leaves(tree) for s in x.addressable_shards if s.device == device
    )


@pytest.fixture(scope="module")
def world(small_world):
    """The CPU demo's small world, trained for 2 steps at batch 8 on a (data 2, fsdp 4) mesh."""
    config, workdir = small_world
    config = config.copy_and_resolve_references()
    config.batch_size = 8
    config.mesh = {"data": 2, "fsdp": 4, "tensor": 1}
    config.train.update(steps=2, checkpoint_every=2, log_every=1)
    config.eval.at_end = False
    return config, workdir


def test_the_plan_agrees_with_a_real_run(world, tmp_path):
    """Planned on abstract inputs = compiled by the trainer for its real arrays (memory analysis, byte for byte),
    and the planned per-device parameter, optimizer and batch bytes = what the real arrays hold on device 0."""
    from vllama_jax.config import model_config
    from vllama_jax.train.sharded import build_sharded_step
    from vllama_jax.train.trainer import train

    config, _ = world
    train(config, tmp_path / "run", log=lambda *_: None)
    startup = json.loads((tmp_path / "run" / "startup.json").read_text())

    mesh = make_mesh(dict(config.mesh))
    result = plan.plan_train(config, mesh, per_device_batch=1)
    assert result["global_batch"] == startup["global_batch"] == 8 and result["text_length"] == startup["text_length"]
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes"):
        assert result["memory"][key] == startup["cost"][key], key
    assert result["flops_per_device"] == startup["cost"]["flops"]
    assert result["global"]["trainable"] == startup["sizes"]["trainable"]

    build = build_sharded_step(config, model_config(config), result["text_length"])
    with jax.set_mesh(build.mesh), nn.logical_axis_rules(build.rules):
        frozen = build.load_frozen(config.train.frozen_checkpoint)
        state = build.initial_state()
        batch = {k: jax.device_put(np.zeros(v.shape, v.dtype), v.sharding) for k, v in build.batch.items()}
    held = result["per_device_parameter_bytes"]
    assert held["frozen"] == _device0_bytes(frozen) and held["batch"] == _device0_bytes(batch)
    assert held["trainable"] == _device0_bytes(state.trainable) and held["optimizer"] == _device0_bytes(state.opt_state)
    # the compiled step's arguments are exactly these arrays (the state's step, rng and skip count included)
    assert result["memory"]["argument_bytes"] == _device0_bytes((state, frozen, batch))
    # FSDP over 4: the frozen LLM's embedding table is split, not replicated
    table = frozen["llama_model"]["embed_tokens"]["embedding"]
    assert table.addressable_shards[0].data.shape[1] == table.shape[1] // 4


def test_largest_batch_search_on_real_compiles(world):
    """The search ends at the batch whose compiled peak fits a capacity and whose successor's does not."""
    config, _ = world
    mesh = make_mesh(dict(config.mesh))
    peak = lambda b: plan.plan_train(config, mesh, b, flops=False)["memory"]["peak_bytes"]  # noqa: E731
    capacity = peak(3) + 1
    found, seen = plan.largest_batch(peak, capacity)
    assert found == 3 and seen[3] <= capacity < seen[4]
    assert len(seen) <= 6, f"too many compiles: {sorted(seen)}"
    assert plan.largest_batch(peak, seen[1] - 1)[0] == 0


def test_decode_plan_shards_the_kv_cache(tiny_config):
    """One decode row per data×fsdp device and the KV heads over `tensor`: each device holds 1/8 of the cache."""
    from vllama_jax.config import model_config

    llm = model_config(tiny_config).llm
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    result = plan.plan_decode(tiny_config, mesh, per_device_batch=2, cache_length=64)
    per_device_rows, heads = 2, llm.num_kv_heads // 2
    expected = llm.num_layers * (
        2 * per_device_rows * 64 * heads * llm.head_dim * 4 + per_device_rows * 64
    )  # k, v float32 + mask
    assert result["per_device_parameter_bytes"]["kv_cache"] == expected + 4 * llm.num_layers  # + each layer's index
    assert result["memory"]["peak_bytes"] > 0 and result["flops_per_device"] > 0
