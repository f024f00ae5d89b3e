"""Test-session set-up, before JAX is imported anywhere: 8 simulated CPU devices; LLVM's cheapest optimisation
level for the programs compiled in the test processes (XLA's own passes, and so the numbers, are unchanged: a
test compiles much and runs little, and this halves the tiny train step's compile time); and a persistent
compilation cache that every test process (pytest-xdist's workers) and every job they start share (a subprocess
inherits the environment; jobs run with the default optimisation level, as a user runs them), so a program
compiled once is read back afterwards. Shared session fixtures below; tests under tests/e2e/ (jobs that start
processes) carry the `e2e` marker, so `pytest tests/unit` is the everyday loop."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# one cache per test run, removed at its end, unless one is given (JAX_COMPILATION_CACHE_DIR=DIR keeps it). The
# first process to read this file makes it: pytest-xdist's workers start after their controller did, and inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vllama-jax-compile-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(items):
    for item in items:
        if "e2e" in Path(str(item.fspath)).relative_to(REPO).parts[:2]:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_config():
    """The tiny model with the stage-1 recipe (configs/video_llama.py:llm=tiny): every CPU test's size."""
    from vllama_jax.config import load_config

    return load_config(str(REPO / "configs/video_llama.py:llm=tiny"))


@pytest.fixture(scope="session")
def demo_config():
    """The CPU demo's config (configs/tiny_shapes.py): the tiny model with its own world of shape clips."""
    from vllama_jax.config import load_config

    return load_config(str(REPO / "configs/tiny_shapes.py"))


@pytest.fixture(scope="session")
def tiny(tiny_config):
    """The tiny Video-LLaMA (image token 511), random parameters and one batch: (config, params, frames (2, 3, 28,
    28, 3), input_ids (2, 10) with soft-token slots 1-4, labels on the last five), for the model and convert tests."""
    import dataclasses

    import flax.linen as nn
    import jax
    import numpy as np

    from vllama_jax.config import model_config
    from vllama_jax.constants import IGNORE_INDEX
    from vllama_jax.models.video_llama import VideoLlama

    image_id = 511
    cfg = dataclasses.replace(model_config(tiny_config), image_token_id=image_id)
    rng = np.random.default_rng(1)
    frames = rng.standard_normal((2, 3, 28, 28, 3)).astype(np.float32)
    ids = rng.integers(3, 500, (2, 10)).astype(np.int32)
    ids[:, 1:5] = image_id
    labels = np.where(np.arange(10) >= 5, ids, IGNORE_INDEX)
    params = jax.jit(lambda: nn.unbox(VideoLlama(cfg).init(jax.random.key(0), frames, ids)["params"]))()
    return cfg, params, frames, ids, labels


@pytest.fixture(scope="session")
def audio_model(tiny_config):
    """Tiny Video-LLaMA with the audio branch sized like the tiny real ImageBind, and its PyTorch twin:
    (config, model, params, torch_branch), `testing.imagebind_reference.tiny_audio_model`."""
    from vllama_jax.config import model_config
    from vllama_jax.testing.imagebind_reference import tiny_audio_model

    return tiny_audio_model(model_config(tiny_config))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE with LLaMA's special tokens and the placeholders, loaded back from a directory."""
    from vllama_jax.data.tokenizer import build_bpe_tokenizer, load_tokenizer

    corpus = ["a red square moves left to right", "the cat sat on the mat", "what moves in the video"] * 4
    path = tmp_path_factory.mktemp("tokenizer")
    build_bpe_tokenizer(corpus, vocab_size=300).save_pretrained(path)
    return load_tokenizer(path)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory, demo_config):
    """(config, directory) of the CPU demo's world at test size (`testing.jobs.SMALL_WORLD`), made once: its clips,
    tokenizer and frozen checkpoint. x264 may encode the same frames differently from run to run, so every test
    reads these bytes (copied, `testing.jobs.copy_world`, where a job writes beside them)."""
    from vllama_jax.testing.jobs import SMALL_WORLD, apply_overrides
    from vllama_jax.train import shapes_world

    config = apply_overrides(demo_config.copy_and_resolve_references(), SMALL_WORLD)
    directory = tmp_path_factory.mktemp("small_world")
    return shapes_world.prepare(config, directory, log=lambda *_: None), directory


@pytest.fixture(scope="session")
def webvid(tmp_path_factory):
    """A WebVid-style folder: five listed clips (one missing on disk, one not a video, one without sound) and one
    whose caption is not UTF-8 in the file; (root, annotations CSV, media folder)."""
    import csv

    from vllama_jax.data.synthetic import write_test_video

    root = tmp_path_factory.mktemp("webvid")
    media = root / "videos"
    (media / "page1").mkdir(parents=True)
    rows = []
    for i in range(5):
        rows.append({"videoid": f"v{i}", "name": f"A clip number {i}.", "page_dir": "page1"})
        if i == 1:
            continue  # listed but missing on disk
        path = media / "page1" / f"v{i}.mp4"
        if i == 3:
            path.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
        else:
            write_test_video(path, num_frames=12 + i, tone_hz=None if i == 4 else 440.0)
    rows.append({"videoid": "v5", "name": "caf\udce9 bytes kept", "page_dir": "page1"})  # not UTF-8 in the file
    write_test_video(media / "page1" / "v5.mp4", num_frames=8)
    csv_path = root / "results.csv"
    with open(csv_path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=["videoid", "name", "page_dir"])
        writer.writeheader()
        writer.writerows(rows)
    return root, csv_path, media
