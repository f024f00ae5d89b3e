"""`vllama-demo`: the one-minute smoke test. Builds the model from a config, runs it on a video clip (a
generated mp4 unless --video is given) and prints the soft-token shape and the stage-1 caption loss.

    vllama-demo --config configs/video_llama.py:llm=tiny [--config.model.llm.num_layers=3] [--video clip.mp4]

Parameters are random (seeded); sharding follows the config's mesh and logical-axis rules.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vllama_jax import sharded_model, sharding
from vllama_jax.config import model_config
from vllama_jax.constants import IMAGE_PLACEHOLDER
from vllama_jax.data import text, video
from vllama_jax.data.synthetic import write_test_video
from vllama_jax.data.tokenizer import build_bpe_tokenizer, load_tokenizer
from vllama_jax.models.video_llama import causal_lm_loss

_CONFIG = config_flags.DEFINE_config_file("config", "configs/video_llama.py:llm=tiny", "model / data / mesh config")
_WORKDIR = flags.DEFINE_string("workdir", None, "where the generated clip and tokenizer go (default: a temp dir)")
_VIDEO = flags.DEFINE_string("video", None, "an mp4 to use instead of the generated clip")
_CAPTION = flags.DEFINE_string("caption", "A red square slides from left to right.", "the caption to score")

# Text the demo tokenizer is trained on when the config names no tokenizer directory.
DEMO_CORPUS = (
    "a red square slides from left to right across a dark background",
    "a blue circle bounces up and down while the camera stays still",
    "the video shows a small object moving across the frame",
    "a person talks to the camera in a quiet room",
) * 8


def make_tokenizer(config, workdir: Path):
    """The config's tokenizer directory, or a small BPE saved under workdir/tokenizer (reloaded from disk)."""
    if config.data.tokenizer:
        return load_tokenizer(config.data.tokenizer)
    tokenizer = build_bpe_tokenizer(DEMO_CORPUS, vocab_size=config.model.llm.vocab_size)
    tokenizer.save_pretrained(workdir / "tokenizer")
    return load_tokenizer(workdir / "tokenizer")


def run(config, workdir: Path, video_path: str | None, caption: str) -> dict:
    """Everything the demo prints, as a dict (the test calls this through the CLI)."""
    tokenizer = make_tokenizer(config, workdir)
    model_cfg = model_config(config)
    base_vocab = len(tokenizer) - 2  # the two placeholders are not LLM tokens
    if base_vocab > model_cfg.llm.vocab_size:
        raise ValueError(f"tokenizer has {base_vocab} tokens but the LLM vocabulary is {model_cfg.llm.vocab_size}")
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    model_cfg = dataclasses.replace(model_cfg, image_token_id=image_token_id)

    if video_path is None:
        video_path = write_test_video(workdir / "clip.mp4", num_frames=24, size=(64, 48))
    frames = video.load_video(
        video_path, config.data.num_frames, model_cfg.vision.image_size, config.data.frame_sampling
    )
    example = text.caption_example(
        tokenizer,
        text.clean_caption(caption),
        num_soft_tokens=model_cfg.num_video_query_tokens,
        image_token_id=image_token_id,
        max_txt_len=config.data.max_txt_len,
        end_sym=config.data.end_sym,
    )
    batch = {k: np.repeat(v[None], config.batch_size, axis=0) for k, v in example.items()}
    batch["frames"] = np.repeat(frames[None], config.batch_size, axis=0)
    text.check_placeholders(batch["input_ids"], image_token_id, model_cfg.num_video_query_tokens)

    model = sharded_model.from_config(config, model_cfg)
    batch_shardings = {k: sharding.batch_sharding(model.mesh, v.ndim, model.rules) for k, v in batch.items()}

    def forward(params, batch):
        logits, soft_tokens = model.module.apply(
            {"params": params}, batch["frames"], batch["input_ids"], batch["padding_mask"]
        )
        loss, count = causal_lm_loss(logits, batch["labels"])
        return soft_tokens["video"], loss, count

    with model.on_mesh():
        start = time.perf_counter()
        params = model.random()
        batch = jax.device_put(batch, batch_shardings)
        soft_tokens, loss, count = jax.jit(forward, in_shardings=(model.shardings, batch_shardings))(params, batch)
        loss = float(loss)
        seconds = time.perf_counter() - start
    return {
        "config": config.name,
        "video": str(video_path),
        "devices": jax.device_count(),
        "mesh": dict(model.mesh.shape),
        "parameters": model.count()[0],
        "trainable_parameters": model.count(model.trainable_names)[0],
        "soft_tokens_shape": list(soft_tokens.shape),
        "caption_tokens": int(count),
        "caption_loss": loss,
        "seconds": round(seconds, 2),
    }


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing (no TPU here) out of the output
    config = _CONFIG.value
    if _WORKDIR.value:
        workdir = Path(_WORKDIR.value)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(config, workdir, _VIDEO.value, _CAPTION.value)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(config, Path(tmp), _VIDEO.value, _CAPTION.value)
    print(f"soft tokens: {tuple(result['soft_tokens_shape'])}  caption loss: {result['caption_loss']:.4f}")
    print(json.dumps(result))


def cli():
    app.run(main)
