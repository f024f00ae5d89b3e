"""The CPU demo's world (`data.source = "shapes_world"`, configs/tiny_shapes.py), which needs no downloads: its
own data, tokenizer and frozen LLM, made in the work directory on first use and reused afterwards. `vllama-train`
calls `prepare` before training when the config names this source.

1. Captioned mp4 clips of coloured shapes in motion, a training set and a held-out set, as ArrayRecord shards
   (`vllama_jax.data.synthetic.shapes_world`), and a BPE tokenizer trained on the caption text.
2. A tiny LLaMA trained on the caption text (`pretrain_llm`), then frozen: it and the randomly initialised
   vision towers are written as the run's frozen-weights checkpoint (`workdir/frozen`), exactly where a real
   run's converted checkpoint goes.
3. After training, greedy captions of the held-out clips are scored per attribute (colour, shape, motion).
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vllama_jax.checkpoints import save_params
from vllama_jax.config import branch, model_config
from vllama_jax.constants import IMAGE_PLACEHOLDER
from vllama_jax.data.synthetic import ATTRIBUTES, SOUND_ATTRIBUTES, attribute_context, parse_caption, shapes_world
from vllama_jax.data.tokenizer import load_tokenizer
from vllama_jax.models.video_llama import VideoLlama, init_params
from vllama_jax.sharded_model import split_params
from vllama_jax.train.pretrain_llm import pretrain_llm, text_examples

SOURCE = "shapes_world"  # the config's data.source that asks for this world


def chance(sounds: bool = False) -> dict[str, float]:
    """Accuracy of a uniform guess per scored attribute (colour, shape, motion; pitch and rhythm with sounds)."""
    attributes = {**ATTRIBUTES, **(SOUND_ATTRIBUTES if sounds else {})}
    return {name: 1 / len(values) for name, values in attributes.items()}


def _captions(annotations: Path) -> list[str]:
    with open(annotations, newline="", encoding="utf-8") as f:
        return [row["name"] for row in csv.DictReader(f)]


def prepare(config: ml_collections.ConfigDict, workdir: str | Path, log=print) -> ml_collections.ConfigDict:
    """Make (or find) the world's data, tokenizer and frozen checkpoint in `workdir`; returns a copy of `config`
    pointing at them (`data.shards`, `data.eval_shards`, `data.tokenizer`, `train.frozen_checkpoint`). Process 0
    writes the media; every process runs the (deterministic) LLM pretraining so that all take part in the
    checkpoint save."""
    if config.data.get("source") != SOURCE or "llm_pretraining" not in config:
        raise ValueError(f"{config.name}: not a {SOURCE} config (data.source = {SOURCE!r} and an llm_pretraining "
                         "section, as configs/tiny_shapes.py has)")
    config, workdir = ml_collections.ConfigDict(config.to_dict()), Path(workdir)
    sizes = dict(num_train=config.data.synthetic_clips, num_eval=config.data.synthetic_eval_clips,
                 vocab_size=config.model.llm.vocab_size, seed=config.seed, sounds=config.data.synthetic_sounds)
    if jax.process_index() == 0:
        shapes_world(workdir, **sizes)
    multihost_utils.sync_global_devices("tiny default data written")
    paths = shapes_world(workdir, **sizes)
    config.data.shards = str(workdir / "data" / "train")
    config.data.eval_shards = str(workdir / "data" / "eval")
    config.data.tokenizer = str(paths["tokenizer"])
    frozen_dir = workdir / "frozen"
    config.train.frozen_checkpoint = str(frozen_dir)
    if frozen_dir.exists():
        return config

    tokenizer = load_tokenizer(paths["tokenizer"])
    rng = np.random.default_rng(config.seed)
    documents = []
    for caption in _captions(workdir / "data" / "train" / "annotations.csv"):
        documents.append((attribute_context(caption) if rng.random() < 0.5 else "", caption))
    pre = config.llm_pretraining
    model_cfg = model_config(config)
    examples = text_examples(tokenizer, documents, pre.length, config.data.end_sym)
    llm_params, losses = pretrain_llm(model_cfg.llm, examples, steps=pre.steps, batch_size=pre.batch_size,
                                      learning_rate=pre.learning_rate, seed=config.seed, log=log)
    # the rest of the frozen model: random towers from the seed, as the trainer would make them
    model = VideoLlama(
        dataclasses.replace(model_cfg, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))
    )
    params = jax.jit(lambda: nn.unbox(init_params(model, jax.random.PRNGKey(config.seed))))()
    frozen = split_params(params, branch(config).trainable)[1]
    frozen["llama_model"] = jax.tree_util.tree_map(
        lambda new, old: np.asarray(new, old.dtype), llm_params, frozen["llama_model"]
    )
    save_params(frozen_dir, frozen)
    log(f"frozen weights written to {frozen_dir} (LLM text loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f})")
    return config


def score(generated: list[str], reference: list[str], config, log=print) -> dict:
    """Held-out evaluation's scores for this world (`eval.score = "shape_attributes"`): accuracy per attribute
    and chance, logged in one line."""
    sounds = config.data.synthetic_sounds
    result = {"attribute_accuracy": attribute_accuracy(generated, reference, sounds), "chance": chance(sounds)}
    log(
        "held-out caption accuracy: "
        + ", ".join(f"{k} {v:.1%}" for k, v in result["attribute_accuracy"].items())
        + " (chance: "
        + ", ".join(f"{k} {v:.0%}" for k, v in result["chance"].items())
        + ")"
    )
    return result


def attribute_accuracy(predicted: list[str], truth: list[str], sounds: bool = False) -> dict[str, float]:
    """Per-attribute accuracy of generated captions against the reference captions, and all of them right."""
    names = chance(sounds)
    scores = {name: 0 for name in names}
    scores["all"] = 0
    for guess, answer in zip(predicted, truth):
        got, want = parse_caption(guess), parse_caption(answer)
        right = {name: got[name] == want[name] for name in names}
        for name, ok in right.items():
            scores[name] += ok
        scores["all"] += all(right.values())
    return {name: value / max(1, len(truth)) for name, value in scores.items()}
