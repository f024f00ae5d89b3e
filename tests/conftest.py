"""Test-session set-up, before JAX is imported anywhere: 8 simulated CPU devices, and a persistent compilation
cache that this process and every job it starts share (a subprocess inherits the environment), so a program
compiled once is read back afterwards instead of compiled again. Shared fixtures below; tests under tests/e2e/
(jobs that start processes) carry the `e2e` marker, so `pytest tests/unit` is the everyday loop."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# one cache per test session, removed at its end, unless one is given (JAX_COMPILATION_CACHE_DIR=DIR keeps it)
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
def tokenizer(tmp_path_factory):
    """A small byte-level BPE with LLaMA's special tokens and the placeholders, loaded back from a directory."""
    from vllama_jax.data.tokenizer import build_bpe_tokenizer, load_tokenizer

    corpus = ["a red square moves left to right", "the cat sat on the mat", "what moves in the video"] * 4
    path = tmp_path_factory.mktemp("tokenizer")
    build_bpe_tokenizer(corpus, vocab_size=300).save_pretrained(path)
    return load_tokenizer(path)
