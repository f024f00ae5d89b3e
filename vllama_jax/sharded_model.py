"""A model on a mesh: the module, the mesh and rules, its abstract parameters and their shardings, and the
loaders that fill them. The trainer, the frozen-feature cache, inference, the planner and the benchmark all
build one the same way (`from_config`); the train step adds only the optimizer, its state and the jitted step
(`train.sharded`).

Nothing here knows a model family beyond `FAMILIES`: a family gives its flax module, a function drawing its
(boxed) parameters from an rng, and the top-level subtrees a config trains. Parameters are split at the top
level into trainable and frozen subtrees; every array is placed by the logical-axis rules, once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from vllama_jax import checkpoints, sharding
from vllama_jax.config import branch, lora_config
from vllama_jax.models import lora
from vllama_jax.models import video_llava as video_llava_model
from vllama_jax.models.video_llama import VideoLlama, init_params


@dataclasses.dataclass
class ShardedModel:
    """`module` with parameters drawn by `init(rng)` (boxed with their logical axes), `trainable_names` of them
    trained, placed on `mesh` by `rules`. Built from shapes alone: nothing is allocated until a loader runs."""

    module: nn.Module
    init: Callable[[jax.Array], Any]
    trainable_names: tuple[str, ...]
    mesh: Mesh
    rules: list
    seed: int = 0

    def __post_init__(self):
        self.boxed_params = jax.eval_shape(lambda: self.init(jax.random.PRNGKey(self.seed)))
        missing = [n for n in self.trainable_names if n not in self.boxed_params]
        if missing:
            raise KeyError(
                f"trainable subtrees {missing} are not in the model (top level: {sorted(self.boxed_params)})"
            )
        self.shardings = sharding.mesh_shardings(self.boxed_params, self.mesh, self.rules)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.boxed_params)

    @property
    def frozen_names(self) -> tuple[str, ...]:
        return tuple(k for k in self.boxed_params if k not in self.trainable_names)

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trainable, frozen) top-level subtrees of `params`."""
        return split_params(params, self.trainable_names)

    def abstract(self, names: Iterable[str] | None = None) -> dict:
        """ShapeDtypeStructs of the subtrees `names` (default: all), each with its sharding."""
        names = self.names if names is None else tuple(names)
        values = sharding.unboxed(self.boxed_params)
        return {k: sharding.with_shardings(values[k], self.shardings[k]) for k in names}

    @contextlib.contextmanager
    def on_mesh(self):
        """The context every computation on these parameters runs in: the mesh and the logical-axis rules."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def random(self, names: Iterable[str] | None = None) -> dict:
        """The subtrees `names` (default: all), random from the seed, each in its sharding (XLA drops what is not
        asked for, so nothing else is allocated)."""
        names = self.names if names is None else tuple(names)
        return jax.jit(
            lambda: {k: v for k, v in nn.unbox(self.init(jax.random.PRNGKey(self.seed))).items() if k in names},
            out_shardings={k: self.shardings[k] for k in names},
        )()

    def load_frozen(self, checkpoint: str, names: Iterable[str] | None = None, log=print) -> dict:
        """The frozen subtrees `names` (default: every frozen one) from the orbax parameter checkpoint
        `checkpoint` (straight into their shardings, after a shape and dtype check; it may hold more), or random
        from the seed when `checkpoint` is empty. Call under `on_mesh()`."""
        names = self.frozen_names if names is None else tuple(names)
        if checkpoint:
            return checkpoints.restore_params(checkpoint, self.abstract(names), subset=True)
        log("frozen weights: random from the seed (set train.frozen_checkpoint to a converted checkpoint)")
        return self.random(names)

    def load_trainable(self, source: str) -> dict:
        """The trainable subtrees from `source` (a run directory's newest checkpoint or a trainable-parameter
        checkpoint; weights only), in their shardings. Call under `on_mesh()`."""
        return checkpoints.restore_trainable(source, self.abstract(self.trainable_names))

    def count(self, names: Iterable[str] | None = None) -> tuple[int, int]:
        """(parameters, bytes) of the subtrees `names` (default: all)."""
        return tree_size(self.abstract(names))


def split_params(params: dict, trainable_names: tuple[str, ...]) -> tuple[dict, dict]:
    """(trainable, frozen) top-level subtrees of `params`; names must exist."""
    missing = [n for n in trainable_names if n not in params]
    if missing:
        raise KeyError(f"trainable subtrees {missing} are not in the model (top level: {sorted(params)})")
    return (
        {k: v for k, v in params.items() if k in trainable_names},
        {k: v for k, v in params.items() if k not in trainable_names},
    )


def tree_size(tree) -> tuple[int, int]:
    """(elements, bytes) of a tree of arrays or ShapeDtypeStructs (boxed or not)."""
    leaves = jax.tree_util.tree_leaves(sharding.unboxed(tree))
    return (
        sum(math.prod(x.shape) for x in leaves),
        sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves),
    )


# ---- the model families ----


def video_llama(config, model_cfg, mesh: Mesh) -> ShardedModel:
    """Video-LLaMA (`models.video_llama`): the branch the config trains (`train.branch`) decides the trainable
    subtrees."""
    module = VideoLlama(model_cfg)
    return ShardedModel(
        module, lambda rng: init_params(module, rng), branch(config).trainable, mesh, rules_of(config), config.seed
    )


def video_llava(config, model_cfg, mesh: Mesh) -> ShardedModel:
    """Video-LLaVA (`models.video_llava`): the config's `train.trainable` subtrees (the recipe's)."""
    module = video_llava_model.VideoLlava(model_cfg)
    return ShardedModel(
        module, lambda rng: video_llava_model.init_params(module, rng), tuple(config.train.trainable), mesh,
        rules_of(config), config.seed,
    )


FAMILIES: dict[str, Callable[..., ShardedModel]] = {"video_llama": video_llama, "video_llava": video_llava}


def rules_of(config) -> list[tuple]:
    """The config's logical-axis rules table as tuples."""
    return [tuple(rule) for rule in config.logical_axis_rules]


def from_config(config, model_cfg, *, mesh: Mesh | None = None) -> ShardedModel:
    """The model `config` describes (`config.family`, default Video-LLaMA), for `model_cfg` (its model config with
    the tokenizer's placeholder ids), on `mesh` (default: the config's `mesh` shape over every device)."""
    family = config.get("family", "video_llama")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}: expected one of {sorted(FAMILIES)}")
    mesh = sharding.make_mesh(dict(config.mesh)) if mesh is None else mesh
    model = FAMILIES[family](config, model_cfg, mesh)
    adapters = lora_config(config)
    return with_lora(model, adapters) if adapters.rank else model


def with_lora(model: ShardedModel, adapters: lora.LoraConfig) -> ShardedModel:
    """`model` with LoRA adapters on its LLM (`models.lora`): a `lora` subtree, trained instead of the LLM."""
    base = model.init

    def init(rng):
        params = base(rng)
        return {**params, **lora.init(params, adapters, jax.random.fold_in(rng, 1))}

    trainable = tuple(n for n in model.trainable_names if n != adapters.subtree) + ("lora",)
    return ShardedModel(model.module, init, trainable, model.mesh, model.rules, model.seed)
