"""The sharded train step of a config: abstract state, shardings by the logical-axis rules, one `jax.jit`.

Built from shapes alone (`jax.eval_shape`, nothing allocated), so the same object serves the trainer (which
then fills it with real arrays), the capacity planner (`vllama-plan`, which compiles it on abstract inputs)
and the benchmark. Every array's sharding is derived here, once, from the models' logical axis names.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from vllama_jax import sharding
from vllama_jax.models.video_llama import FROZEN_TOWERS, TRAINABLE, VideoLlama, VideoLlamaConfig, init_params
from vllama_jax.train.checkpoints import restore_params
from vllama_jax.train.optimizer import OptimizerConfig, make_optimizer
from vllama_jax.train.step import TrainState, batch_keys, init_state, make_train_step, split_params


def unboxed(tree):
    """The values of a boxed tree without nn.unbox's sharding constraints (which need concrete arrays under a mesh)."""
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    return jax.tree_util.tree_map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def batch_shapes(model_cfg: VideoLlamaConfig, batch_size: int, num_frames: int, text_length: int,
                 clips_per_video: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes of every array a train step may read (the data pipeline's and the feature cache's)."""
    size = model_cfg.vision.image_size
    return {
        "frames": jax.ShapeDtypeStruct((batch_size, num_frames, size, size, 3), jnp.float32),
        "frame_mask": jax.ShapeDtypeStruct((batch_size, num_frames), jnp.bool_),  # an image: frame 0 only
        "audio": jax.ShapeDtypeStruct((batch_size, clips_per_video, 1, *model_cfg.imagebind_audio.input_size), jnp.float32),
        # the frozen towers' outputs, float32 as the towers hand them over (VideoLlama.frame_features, audio_features)
        "video_features": jax.ShapeDtypeStruct((batch_size, num_frames, model_cfg.num_query_tokens, model_cfg.qformer.hidden_size), jnp.float32),
        "audio_features": jax.ShapeDtypeStruct((batch_size, clips_per_video, model_cfg.imagebind_audio.out_dim), jnp.float32),
        "input_ids": jax.ShapeDtypeStruct((batch_size, text_length), jnp.int32),
        "padding_mask": jax.ShapeDtypeStruct((batch_size, text_length), jnp.bool_),
        "labels": jax.ShapeDtypeStruct((batch_size, text_length), jnp.int32),
    }


@dataclasses.dataclass
class ShardedStep:
    """A config's train step over a mesh. `step_fn(state, frozen, batch) -> (state, metrics)` is jitted with
    explicit in/out shardings and donates the state; `frozen` holds the frozen parameters the step reads (with
    `cached`, not the towers whose outputs the batch carries)."""

    model: VideoLlama
    optimizer: optax.GradientTransformation
    mesh: Mesh
    rules: list
    trainable_names: tuple[str, ...]
    cached: bool
    boxed_params: Any  # every parameter, abstract and boxed with its logical axes
    abstract_state: TrainState  # abstract, boxed
    state_shardings: TrainState
    frozen_shardings: dict
    batch: dict[str, jax.ShapeDtypeStruct]  # global shapes, with their shardings
    step_fn: Any
    make_state: Any  # params (unboxed) -> TrainState; for jit with out_shardings
    seed: int

    def random_params(self):
        """Every parameter, boxed, random from the config's seed (call inside jax.jit; nothing else allocates)."""
        return init_params(self.model, jax.random.PRNGKey(self.seed))

    def load_frozen(self, checkpoint: str, names: tuple[str, ...] | None = None, log=print) -> dict:
        """The frozen parameters `names` (default: those the step reads), each in its sharding: from the orbax
        `checkpoint` (straight into the shardings, after a shape and dtype check; it may hold more), or random
        from the seed when `checkpoint` is empty. Call under the mesh."""
        names = self.frozen_names if names is None else names
        boxed = {k: v for k, v in split_params(self.boxed_params, self.trainable_names)[1].items() if k in names}
        shardings = sharding.mesh_shardings(boxed, self.mesh, self.rules)
        if checkpoint:
            return restore_params(checkpoint, unboxed(boxed), shardings, subset=True)
        log("frozen weights: random from the seed (set train.frozen_checkpoint to a converted checkpoint)")
        return jax.jit(lambda: {k: v for k, v in nn.unbox(self.random_params()).items() if k in names},
                       out_shardings=shardings)()

    def initial_state(self) -> TrainState:
        """A fresh train state in its shardings, random from the seed (XLA drops the unused frozen half)."""
        return jax.jit(lambda: self.make_state(nn.unbox(self.random_params())), out_shardings=self.state_shardings)()

    @property
    def frozen_names(self) -> tuple[str, ...]:
        return tuple(self.frozen_shardings)

    def sizes(self) -> dict:
        """Parameter counts and bytes: trainable, frozen (those the step reads), optimizer state; and the frozen
        subtrees the step does not read (the towers, when it reads cached features)."""
        def count(tree):
            leaves = jax.tree_util.tree_leaves(unboxed(tree))
            return sum(math.prod(x.shape) for x in leaves), sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)

        (trainable, trainable_bytes), (frozen, frozen_bytes) = count(self.abstract_state.trainable), count(self.abstract_frozen())
        not_read = [k for k in split_params(self.boxed_params, self.trainable_names)[1] if k not in self.frozen_shardings]
        return {"trainable": trainable, "trainable_bytes": trainable_bytes, "frozen": frozen, "frozen_bytes": frozen_bytes,
                "optimizer_bytes": count(self.abstract_state.opt_state)[1], "not_read": not_read}

    def abstract_frozen(self):
        """ShapeDtypeStructs of the frozen parameters the step reads, with their shardings."""
        frozen = {k: v for k, v in unboxed(self.boxed_params).items() if k in self.frozen_shardings}
        return _with_shardings(frozen, self.frozen_shardings)

    def abstract_arguments(self):
        """(state, frozen, batch) as ShapeDtypeStructs with shardings: what `lower` compiles for."""
        return _with_shardings(unboxed(self.abstract_state), self.state_shardings), self.abstract_frozen(), self.batch

    def lower(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.step_fn.lower(*self.abstract_arguments())


def _with_shardings(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build_sharded_step(config, model_cfg: VideoLlamaConfig, text_length: int, *, mesh: Mesh | None = None,
                       batch_size: int | None = None, cached: bool | None = None) -> ShardedStep:
    """The train step `config` runs (its branch, audio source, optimizer, mesh and rules), for `model_cfg` (the
    config's model with the tokenizer's placeholder ids) and `text_length` tokens per example. `batch_size`
    (global) defaults to config.batch_size; `cached` to whether config.data.feature_cache is set."""
    branch, audio_source = config.train.branch, config.data.audio_source
    cached = bool(config.data.get("feature_cache", "")) if cached is None else cached
    batch_size = config.batch_size if batch_size is None else batch_size
    mesh = sharding.make_mesh(dict(config.mesh)) if mesh is None else mesh
    rules = [tuple(r) for r in config.logical_axis_rules]
    trainable_names = TRAINABLE[branch]
    opt_cfg = OptimizerConfig(**config.optimizer.to_dict())

    model = VideoLlama(model_cfg)
    boxed = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(config.seed)))  # = random_params()
    boxed_frozen = split_params(boxed, trainable_names)[1]
    if cached:
        boxed_frozen = {k: v for k, v in boxed_frozen.items() if k not in FROZEN_TOWERS}
    optimizer = make_optimizer(opt_cfg)

    def make_state(params):
        return init_state(split_params(params, trainable_names)[0], optimizer, jax.random.PRNGKey(config.seed + 1))

    abstract_state = jax.eval_shape(make_state, boxed)
    state_shardings = sharding.mesh_shardings(abstract_state, mesh, rules)
    frozen_shardings = sharding.mesh_shardings(boxed_frozen, mesh, rules)
    shapes = batch_shapes(model_cfg, batch_size, config.data.num_frames, text_length, config.data.clips_per_video)
    batch = {k: jax.ShapeDtypeStruct(shapes[k].shape, shapes[k].dtype,
                                     sharding=sharding.batch_sharding(mesh, len(shapes[k].shape), rules))
             for k in batch_keys(branch, audio_source, cached)}
    step_fn = jax.jit(
        make_train_step(model, optimizer, opt_cfg, branch, audio_source, cached),
        in_shardings=(state_shardings, frozen_shardings, {k: v.sharding for k, v in batch.items()}),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    return ShardedStep(model=model, optimizer=optimizer, mesh=mesh, rules=rules, trainable_names=trainable_names,
                       cached=cached, boxed_params=boxed, abstract_state=abstract_state, state_shardings=state_shardings,
                       frozen_shardings=frozen_shardings, batch=batch, step_fn=step_fn, make_state=make_state,
                       seed=config.seed)
