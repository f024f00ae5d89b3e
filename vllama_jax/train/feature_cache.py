"""The frozen-feature cache: run the frozen towers once over a shard set, then train the branch from their outputs.

    vllama-cache --config configs/video_llama.py:llama2_7b_chat --out cache/webvid \\
        --config.data.shards=shards/webvid --config.data.tokenizer=llama-2-7b-chat-hf \\
        --config.train.frozen_checkpoint=ckpt/frozen
    vllama-train --config configs/video_llama.py:llama2_7b_chat --workdir runs/stage1 \\
        --config.data.feature_cache=cache/webvid --config.data.tokenizer=… --config.train.frozen_checkpoint=ckpt/frozen

The glue a stage trains sits after frozen towers that dominate the step's FLOPs (EVA ViT-g on 8 × 257 tokens
per clip; ImageBind). Their outputs for a clip never change, so they can be computed once: per usable example
the cache stores `VideoLlama.frame_features` (ViT → ln_vision → image Q-Former) and/or `audio_features`
(ImageBind), in the towers' output dtype, with the example's tokens and frame mask exactly as the media
pipeline made them.
A step from the cache computes the same loss as the end-to-end step on the same media
(tests/unit/train/test_feature_cache.py) and reads no tower weights.

What a cache gives up: every epoch sees the same frames of a clip. The writer uses the eval transform (uniform
frames, resize) unless --augment, which freezes one training draw (head-tail frames, random resized crop) per
clip. ImageBind's audio-tower drop path, active in end-to-end training, is off (the towers run in eval mode).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from vllama_jax import sharded_model, sharding
from vllama_jax.config import branch as config_branch
from vllama_jax.data.features import EXAMPLE_KEYS, FeatureShardWriter, encode
from vllama_jax.data.pipeline import make_single_pass, reason_counts
from vllama_jax.data.tokenizer import load_tokenizer
from vllama_jax.models.video_llama import VideoLlama
from vllama_jax.train.inputs import batch_shapes, cache_layout, model_and_pipeline, shards_of


def reading_config(pipeline_cfg, augment: bool = False):
    """How the cache writer reads media: the eval transform (uniform frames, resize) or one training draw."""
    return dataclasses.replace(pipeline_cfg, train=augment, worker_count=0,
                               frame_sampling=pipeline_cfg.frame_sampling if augment else "uniform")


def write_feature_cache(config, out: str | Path, *, augment: bool = False, records_per_shard: int = 1000,
                        log=print) -> dict:
    """Run the frozen towers of `config`'s branch over `config.data.shards` once and write the cache to `out`
    (one set of shards per process, one manifest). Returns the manifest."""
    out = Path(out)
    tokenizer = load_tokenizer(config.data.tokenizer)
    model_cfg, pipeline_cfg = model_and_pipeline(config, tokenizer)
    branch = config_branch(config)
    media, cached_keys = branch.media_keys(), branch.media_keys(cached=True)
    batches = make_single_pass(shards_of(config.data.shards), reading_config(pipeline_cfg, augment), tokenizer)

    # the model on the config's mesh: the towers run sharded as in the end-to-end step
    sharded = sharded_model.from_config(config, model_cfg)
    model, mesh, rules = sharded.module, sharded.mesh, sharded.rules
    shapes = batch_shapes(model_cfg, 1, pipeline_cfg.num_frames, pipeline_cfg.text_length, pipeline_cfg.clips_per_video)
    in_shardings = {k: sharding.batch_sharding(mesh, len(shapes[k].shape), rules) for k in media}

    def towers(params, batch):
        inputs = branch.model_inputs(batch)
        outputs = {}
        if "video_features" in cached_keys:
            outputs["video_features"] = model.apply(
                {"params": params}, inputs["frames"], method=VideoLlama.frame_features
            )
        if "audio_features" in cached_keys:
            outputs["audio_features"] = model.apply(
                {"params": params}, inputs["audio"], inputs["audio_modality"], method=VideoLlama.audio_features
            )
        return outputs

    index, count = jax.process_index(), jax.process_count()
    layout = cache_layout(branch, model_cfg, pipeline_cfg)
    writer = FeatureShardWriter(
        out,
        name=f"features-p{index:03d}",
        records_per_shard=records_per_shard,
        manifest_name=f"manifest-p{index:03d}.json" if count > 1 else "manifest.json",
        info={"config": config.name, "augment": augment, "layout": layout},
    )
    skipped: dict[str, int] = {}
    started, written = time.perf_counter(), 0
    with sharded.on_mesh():
        # the towers and the small parameters `setup` declares (query tokens), which any method needs present;
        # not the LLM. The trainable glue is random from the seed: the towers' outputs do not depend on it.
        towers_and_glue = tuple(k for k in sharded.frozen_names if k != "llama_model")
        params = {
            **sharded.load_frozen(config.train.frozen_checkpoint, towers_and_glue, log),
            **sharded.random(sharded.trainable_names),
        }
        run = jax.jit(towers)
        for n, batch in enumerate(batches):
            arrays = {k: jax.make_array_from_process_local_data(in_shardings[k], batch[k]) for k in media}
            features = run(params, arrays)  # this process's rows of each, back on the host:
            local = {
                k: np.asarray(
                    multihost_utils.global_array_to_host_local_array(
                        v, mesh, sharding.batch_sharding(mesh, v.ndim, rules).spec
                    )
                )
                for k, v in features.items()
            }
            for key, value in reason_counts(batch).items():
                if key.startswith("skipped/") and value:
                    skipped[key] = skipped.get(key, 0) + value
            for row in np.flatnonzero(batch["example_mask"]):
                example = {k: local[k][row] for k in local}
                example.update({k: batch[k][row] for k in EXAMPLE_KEYS})
                writer.write(encode(f"{index}:{n}:{row}", example))
                written += 1
            if (n + 1) % 10 == 0:
                log(f"  {written} examples cached ({written / (time.perf_counter() - started):.1f}/s)")
    manifest = writer.close(skipped=skipped)
    multihost_utils.sync_global_devices("feature cache shards written")
    if count > 1 and index == 0:
        manifest = _merge_manifests(out, count)
    log(
        f"feature cache {out}: {manifest['records']} examples in {len(manifest['shards'])} shards"
        + (f"; skipped {skipped}" if skipped else "")
        + f" ({time.perf_counter() - started:.1f} s)"
    )
    return manifest


def _merge_manifests(out: Path, count: int) -> dict:
    parts = [json.loads((out / f"manifest-p{i:03d}.json").read_text()) for i in range(count)]
    skipped: dict[str, int] = {}
    for part in parts:
        for key, value in part.get("skipped", {}).items():
            skipped[key] = skipped.get(key, 0) + value
    merged = {
        **parts[0],
        "name": "features",
        "records": sum(p["records"] for p in parts),
        "shards": [s for p in parts for s in p["shards"]],
        "skipped": skipped,
    }
    (out / "manifest.json").write_text(json.dumps(merged, indent=1))
    return merged
