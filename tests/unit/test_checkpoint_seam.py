"""The train-state checkpoint seam (`checkpoints.Checkpointer`) and the weights-only restore, on real orbax
directories: the save cadence and pruning, resume with the data iterator's position, a stage-2 start from another
run's weights with a fresh optimizer, and weights read without building an optimizer."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vllama_jax.checkpoints import Checkpointer, latest_step, restore_trainable
from vllama_jax.train.step import TrainState, init_state


def make_state(seed: float = 0.0, optimizer=optax.adam(1e-3)) -> TrainState:
    trainable = {"llama_proj": {"kernel": jnp.full((4, 3), seed), "bias": jnp.arange(3.0) + seed}}
    return init_state(trainable, optimizer, jax.random.PRNGKey(1))


def abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def iterator():
    return iter(grain.MapDataset.range(100).batch(2).to_iter_dataset())


def fresh_or_fail():
    raise AssertionError("fresh() must not be called when there is something to restore")


def test_saves_on_cadence_keeps_the_newest_and_resumes_state_and_data(tmp_path):
    batches = iterator()
    with Checkpointer(tmp_path, every=3, keep=2, total_steps=7) as checkpointer:
        saved = [step for step in range(1, 8)
                 if checkpointer.on_step(step, make_state(float(step)), (next(batches), batches)[1])]
    assert saved == [3, 6, 7]  # every 3 steps and the last
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [6, 7] == [6, latest_step(tmp_path)]
    expected_next = next(batches)

    resumed_batches = iterator()
    with Checkpointer(tmp_path, every=3, keep=2, total_steps=7) as checkpointer:
        state = checkpointer.restore_or_init(abstract(make_state()), resumed_batches, fresh=fresh_or_fail,
                                             from_trainable=fresh_or_fail, log=lambda *_: None)
    np.testing.assert_array_equal(state.trainable["llama_proj"]["kernel"], np.full((4, 3), 7.0))
    np.testing.assert_array_equal(next(resumed_batches), expected_next)  # the data goes on where it stopped


def test_a_forced_save_happens_off_the_cadence(tmp_path):
    with Checkpointer(tmp_path, every=100, keep=3, total_steps=1000) as checkpointer:
        assert not checkpointer.on_step(5, make_state(), iterator())
        assert checkpointer.on_step(6, make_state(), iterator(), force=True)  # preemption, non-finite stop
    assert latest_step(tmp_path) == 6


def test_fresh_or_from_another_runs_weights(tmp_path):
    with Checkpointer(tmp_path / "empty", every=1, keep=1, total_steps=1) as checkpointer:
        state = checkpointer.restore_or_init(abstract(make_state()), iterator(), fresh=lambda: "fresh",
                                             from_trainable=fresh_or_fail, log=lambda *_: None)
    assert state == "fresh"

    with Checkpointer(tmp_path / "stage1", every=1, keep=1, total_steps=4) as checkpointer:
        checkpointer.on_step(4, make_state(2.5), iterator())
    lines = []
    with Checkpointer(tmp_path / "stage2", every=1, keep=1, total_steps=1) as checkpointer:
        got = checkpointer.restore_or_init(abstract(make_state()), iterator(), fresh=fresh_or_fail,
                                           from_trainable=lambda weights: weights,
                                           init_trainable=str(tmp_path / "stage1"), log=lines.append)
    np.testing.assert_array_equal(got["llama_proj"]["bias"], np.arange(3.0) + 2.5)
    assert lines == [f"trainable weights from {tmp_path / 'stage1'}"]


def test_weights_only_restore_needs_no_optimizer(tmp_path):
    """A run saved with AdamW state; its weights are read with the trainable shapes alone (another optimizer's
    state, or none, is never built), each array placed in the sharding its abstract leaf carries."""
    with Checkpointer(tmp_path, every=1, keep=1, total_steps=3) as checkpointer:
        checkpointer.on_step(3, make_state(1.0, optax.adamw(1e-3)), iterator())
    mesh = jax.make_mesh((8,), ("fsdp",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    wanted = {"llama_proj": {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32, sharding=replicated),
                             "bias": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=replicated)}}
    weights = restore_trainable(tmp_path, wanted)
    np.testing.assert_array_equal(weights["llama_proj"]["kernel"], np.ones((4, 3)))
    assert weights["llama_proj"]["kernel"].sharding == replicated
    wanted["llama_proj"]["kernel"] = jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=sharded)
    with pytest.raises(ValueError, match=r"checkpoint has \(4, 3\) float32, the model wants \(8, 3\) float32"):
        restore_trainable(tmp_path, wanted)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        (tmp_path / "nothing" / "checkpoints").mkdir(parents=True)
        restore_trainable(tmp_path / "nothing", wanted)
