"""Every orbax checkpoint (`vllama_jax/checkpoints.py`), on real orbax directories: parameter checkpoints restored
straight into their shardings and refused with names when they do not fit; the train-state seam (`Checkpointer`):
the save cadence and pruning, resume with the data iterator's position, a stage-2 start from another run's weights
with a fresh optimizer; weights read without building an optimizer."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vllama_jax.checkpoints import Checkpointer, latest_step, restore_params, restore_trainable, save_params
from vllama_jax.train.step import TrainState, init_state


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
