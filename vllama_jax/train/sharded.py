"""The sharded train step of a config: the model on its mesh (`sharded_model`) plus the optimizer, the train
state's shardings and one `jax.jit`.

Built from shapes alone (`jax.eval_shape`, nothing allocated), so the same object serves the trainer (which
then fills it with real arrays), the capacity planner (`vllama-plan`, which compiles it on abstract inputs)
and the benchmark. Every array's sharding is derived from the models' logical axis names.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from vllama_jax import sharded_model, sharding
from vllama_jax.config import branch as config_branch
from vllama_jax.config import lora_config
from vllama_jax.models import lora
from vllama_jax.models.video_llama import FROZEN_TOWERS, VideoLlamaConfig
from vllama_jax.models.video_llava import video_llava_loss
from vllama_jax.sharded_model import ShardedModel, tree_size
from vllama_jax.train.flops import compiled_costs, scan_aware_costs
from vllama_jax.train.inputs import batch_shapes
from vllama_jax.train.optimizer import OptimizerConfig, make_optimizer
from vllama_jax.train.step import TrainState, init_state, make_train_step, video_llama_loss


@dataclasses.dataclass
class ShardedStep:
    """A config's train step over a mesh. `step_fn(state, frozen, batch) -> (state, metrics)` is jitted with
    explicit in/out shardings and donates the state; `frozen` holds the frozen subtrees the step reads
    (`frozen_names`: with `cached`, not the towers whose outputs the batch carries)."""

    model: ShardedModel
    optimizer: optax.GradientTransformation
    frozen_names: tuple[str, ...]
    cached: bool
    abstract_state: TrainState  # abstract, boxed
    state_shardings: TrainState
    batch: dict[str, jax.ShapeDtypeStruct]  # global shapes, with their shardings
    step_fn: Any
    state_seed: int

    @property
    def mesh(self):
        return self.model.mesh

    @property
    def rules(self):
        return self.model.rules

    def load_frozen(self, checkpoint: str, log=print) -> dict:
        """The frozen subtrees the step reads, in their shardings (`ShardedModel.load_frozen`). Call under the mesh."""
        return self.model.load_frozen(checkpoint, self.frozen_names, log)

    def state_from_trainable(self, trainable) -> TrainState:
        """A fresh train state (step 0, new optimizer state) around trainable weights, in the state's shardings."""
        make = lambda t: init_state(t, self.optimizer, jax.random.PRNGKey(self.state_seed))  # noqa: E731
        return jax.jit(make, out_shardings=self.state_shardings)(trainable)

    def initial_state(self) -> TrainState:
        """A fresh train state in its shardings, random from the seed (XLA drops the unused frozen half)."""
        return self.state_from_trainable(self.model.random(self.model.trainable_names))

    def abstract_state_with_shardings(self) -> TrainState:
        return sharding.with_shardings(sharding.unboxed(self.abstract_state), self.state_shardings)

    def abstract_arguments(self):
        """(state, frozen, batch) as ShapeDtypeStructs with shardings: what `lower` compiles for."""
        return self.abstract_state_with_shardings(), self.model.abstract(self.frozen_names), self.batch

    def lower(self):
        with self.model.on_mesh():
            return self.step_fn.lower(*self.abstract_arguments())

    def sizes(self) -> dict:
        """Parameter counts and bytes: trainable, frozen (those the step reads), optimizer state; and the frozen
        subtrees the step does not read (the towers, when it reads cached features)."""
        (trainable, trainable_bytes) = tree_size(self.abstract_state.trainable)
        (frozen, frozen_bytes) = self.model.count(self.frozen_names)
        not_read = [k for k in self.model.frozen_names if k not in self.frozen_names]
        return {
            "trainable": trainable,
            "trainable_bytes": trainable_bytes,
            "frozen": frozen,
            "frozen_bytes": frozen_bytes,
            "optimizer_bytes": tree_size(self.abstract_state.opt_state)[1],
            "not_read": not_read,
        }


def video_llava_batch_shapes(model_cfg, batch_size: int, text_length: int, image_share: float,
                             video_share: float) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes of a Video-LLaVA batch: `batch_size` rows of `text_length` tokens, and the static numbers of
    images (image_share × rows) and videos (video_share × rows) they hold (`models.video_llava`: the k-th of the
    batch fills the k-th block of placeholders); a kind with none is left out of the batch."""
    image, video = model_cfg.image_tower, model_cfg.video_tower
    images, videos = int(batch_size * image_share), int(batch_size * video_share)
    media = {
        "images": jax.ShapeDtypeStruct((images, image.image_size, image.image_size, 3), np.float32),
        "videos": jax.ShapeDtypeStruct((videos, video.num_frames, video.image_size, video.image_size, 3), np.float32),
    }
    return {
        **{k: v for k, v in media.items() if v.shape[0]},
        "input_ids": jax.ShapeDtypeStruct((batch_size, text_length), np.int32),
        "padding_mask": jax.ShapeDtypeStruct((batch_size, text_length), np.bool_),
        "labels": jax.ShapeDtypeStruct((batch_size, text_length), np.int32),
    }


def build_sharded_step(
    config,
    model_cfg: VideoLlamaConfig,
    text_length: int,
    *,
    mesh=None,
    batch_size: int | None = None,
    cached: bool | None = None,
) -> ShardedStep:
    """The train step `config` runs (its branch, optimizer, mesh and rules), for `model_cfg` (the config's model
    with the tokenizer's placeholder ids) and `text_length` tokens per example. `batch_size` (global) defaults to
    config.batch_size; `cached` to whether config.data.feature_cache is set."""
    cached = bool(config.data.get("feature_cache", "")) if cached is None else cached
    batch_size = config.batch_size if batch_size is None else batch_size
    model = sharded_model.from_config(config, model_cfg, mesh=mesh)
    if config.get("family", "video_llama") == "video_llava":  # media only, no feature cache
        frozen_names, loss_fn = model.frozen_names, video_llava_loss(model.module)
        shapes = video_llava_batch_shapes(model_cfg, batch_size, text_length, config.data.image_share,
                                          config.data.video_share)
    else:
        branch = config_branch(config)
        frozen_names = tuple(k for k in model.frozen_names if not (cached and k in FROZEN_TOWERS))
        loss_fn = video_llama_loss(model.module, branch, cached)
        all_shapes = batch_shapes(model_cfg, batch_size, config.data.num_frames, text_length,
                                  config.data.clips_per_video)
        shapes = {k: all_shapes[k] for k in branch.batch_keys(cached)}
    adapters = lora_config(config)
    if adapters.rank:  # the LLM runs with its adapters folded in
        family_loss = loss_fn
        loss_fn = lambda params, batch, rng: family_loss(lora.merge(params, adapters), batch, rng)  # noqa: E731
    opt_cfg = OptimizerConfig(**config.optimizer.to_dict())
    optimizer = make_optimizer(opt_cfg)
    state_seed = config.seed + 1
    trainable = model.split(model.boxed_params)[0]
    abstract_state = jax.eval_shape(lambda t: init_state(t, optimizer, jax.random.PRNGKey(state_seed)), trainable)
    state_shardings = sharding.mesh_shardings(abstract_state, model.mesh, model.rules)
    batch = {
        k: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=_batch_sharding(model, shape.shape))
        for k, shape in shapes.items()
    }
    step_fn = jax.jit(
        make_train_step(loss_fn, optimizer, opt_cfg),
        in_shardings=(
            state_shardings,
            {k: model.shardings[k] for k in frozen_names},
            {k: v.sharding for k, v in batch.items()},
        ),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    return ShardedStep(
        model=model,
        optimizer=optimizer,
        frozen_names=frozen_names,
        cached=cached,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        batch=batch,
        step_fn=step_fn,
        state_seed=state_seed,
    )


def _batch_sharding(model: ShardedModel, shape: tuple[int, ...]) -> NamedSharding:
    """Rows over the batch axes; an array whose leading size they do not divide (a Video-LLaVA batch's few
    images or videos) is replicated instead."""
    rows = sharding.batch_sharding(model.mesh, len(shape), model.rules)
    axes = rows.spec[0] if len(rows.spec) else None
    shards = math.prod(model.mesh.shape[name] for name in ((axes,) if isinstance(axes, str) else (axes or ())))
    return rows if shape[0] % shards == 0 else NamedSharding(model.mesh, PartitionSpec())


def step_flops(
    config,
    model_cfg: VideoLlamaConfig,
    text_length: int,
    *,
    mesh,
    batch_size: int | None = None,
    cached: bool | None = None,
    unscanned: float | None = None,
) -> float:
    """Per-device FLOPs of `build_sharded_step(...)`'s step with every scanned layer counted (`flops.scan_aware_flops`:
    XLA counts a loop body once); `unscanned` is the count of the step already compiled, used when nothing is
    scanned."""
    return step_costs(
        config,
        model_cfg,
        text_length,
        mesh=mesh,
        batch_size=batch_size,
        cached=cached,
        unscanned=None if unscanned is None else {"flops": unscanned},
    )["flops"]


def step_costs(
    config,
    model_cfg: VideoLlamaConfig,
    text_length: int,
    *,
    mesh,
    batch_size: int | None = None,
    cached: bool | None = None,
    unscanned: dict[str, float] | None = None,
) -> dict[str, float]:
    """`step_flops` with the compiler's own time estimate beside the FLOPs where it gives one (XLA:TPU's
    `optimal_seconds`), both counted over every scanned layer; `unscanned` is the costs of the step already
    compiled (`flops.compiled_costs`)."""
    return scan_aware_costs(
        model_cfg,
        lambda m: compiled_costs(
            build_sharded_step(config, m, text_length, mesh=mesh, batch_size=batch_size, cached=cached)
            .lower()
            .compile()
        ),
        unscanned=unscanned,
    )
