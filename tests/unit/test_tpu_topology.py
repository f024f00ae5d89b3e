"""Compile-only TPU devices (libtpu, no TPU attached): the planner's figures are the TPU compiler's memory analysis,
meshes are placed on the torus or refused with the ones that fit, multislice puts the data axis over the slices."""
import os

import pytest

from vllama_jax import plan, tpu_topology

pytestmark = pytest.mark.skipif(
    tpu_topology.libtpu_version() is None, reason=f"libtpu is not installed: {tpu_topology.INSTALL_HINT}"
)


def test_tiny_train_step_compiles_for_v5e_and_the_plan_is_the_compilers(tiny_config):
    """The planner's memory figures, FLOPs and time estimate are exactly the TPU compiler's analyses of the same
    step (the tiny model is unscanned, so no layer is extrapolated)."""
    from vllama_jax.config import model_config
    from vllama_jax.train.sharded import build_sharded_step

    chips = tpu_topology.devices("v5e:2x2")
    assert len(chips) == 4 and chips[0].device_kind == "TPU v5 lite"
    mesh = tpu_topology.make_mesh({"fsdp": 2, "tensor": 2}, chips)
    planned = plan.plan_train(tiny_config, mesh, per_device_batch=2, topology="v5e:2x2")
    assert planned["device_kind"] == "TPU v5 lite" and planned["topology"] == "v5e:2x2"
    assert planned["compiler"].startswith("XLA:TPU (libtpu ")

    model_cfg = model_config(tiny_config)
    compiled = build_sharded_step(tiny_config, model_cfg, planned["text_length"], mesh=mesh, batch_size=4)
    compiled = compiled.lower().compile()
    stats, cost = compiled.memory_analysis(), compiled.cost_analysis()
    memory = planned["memory"]
    assert memory["argument_bytes"] == stats.argument_size_in_bytes
    assert memory["temp_bytes"] == stats.temp_size_in_bytes
    assert memory["output_bytes"] == stats.output_size_in_bytes
    assert memory["alias_bytes"] == stats.alias_size_in_bytes
    assert memory["compiler_peak_bytes"] == stats.peak_memory_in_bytes > 0
    assert plan.fit_bytes(memory) == stats.peak_memory_in_bytes
    assert planned["flops_per_device"] == cost["flops"] > 0
    assert planned["estimated_step_seconds"] == cost["optimal_seconds"] > 0
    report = "\n".join(plan.report(planned, ["v5e"]))
    assert "v5e:2x2 (4 TPU v5 lite chips, compile-only)" in report and "the compiler's own" in report
    assert "cost-model estimate" in report


def test_a_mesh_the_torus_cannot_hold_is_refused_with_the_ones_that_fit():
    chips = tpu_topology.devices("v5p:4x4x4")
    assert tpu_topology.torus(chips) == (4, 4, 4)
    with pytest.raises(ValueError, match=r"does not fit the 4x4x4 torus") as refused:
        tpu_topology.make_mesh({"data": 2, "fsdp": 32}, chips)
    assert "data=1,fsdp=64,tensor=1" in str(refused.value) and "data=4,fsdp=16,tensor=1" in str(refused.value)
    with pytest.raises(ValueError, match="needs 8 devices, have 64"):
        tpu_topology.make_mesh({"fsdp": 8}, chips)
    assert tpu_topology.make_mesh({"fsdp": 16, "tensor": 4}, chips).shape == {"data": 1, "fsdp": 16, "tensor": 4}


def test_multislice_puts_the_data_axis_over_the_slices():
    chips = tpu_topology.devices("v5e:2x2", num_slices=2)
    mesh = tpu_topology.make_mesh({"data": 2, "fsdp": 4}, chips, num_slices=2)
    for i in range(2):  # each row of the data axis is one slice: FSDP's gathers stay on ICI
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
    with pytest.raises(ValueError, match="multiple of 2"):
        tpu_topology.make_mesh({"fsdp": 8}, chips, num_slices=2)


def test_unknown_topology_and_missing_libtpu_say_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match="v5p:4x4x8"):
        tpu_topology.devices("v9z:1x1")
    monkeypatch.setattr(tpu_topology, "libtpu_version", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[tpu\]'"):
        tpu_topology.devices("v5e:2x2")
    assert os.environ.get("TPU_SKIP_MDS_QUERY") == "1"  # set before libtpu was first asked


@pytest.mark.parametrize("topology, row", [("v4:2x2x1", "v4"), ("v5e:2x2", "v5e"), ("v5p:2x2x1", "v5p"),
                                           ("v6e:2x2", "v6e")])
def test_the_accelerator_table_knows_each_chip_by_the_kind_libtpu_reports(topology, row):
    """The planner's fit and the trainer's MFU read one table, matched by the device kind the compiler reports."""
    from vllama_jax import accelerators

    assert accelerators.by_device_kind(tpu_topology.devices(topology)[0].device_kind).name == row
