"""Test-session set-up: 8 simulated CPU devices (before JAX is imported anywhere) and shared fixtures."""
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_config():
    from vllama_jax.config import load_config

    return load_config(str(REPO / "configs/video_llama.py:tiny"))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE with LLaMA's special tokens and the placeholders, loaded back from a directory."""
    from vllama_jax.data.tokenizer import build_bpe_tokenizer, load_tokenizer

    corpus = ["a red square moves left to right", "the cat sat on the mat", "what moves in the video"] * 4
    path = tmp_path_factory.mktemp("tokenizer")
    build_bpe_tokenizer(corpus, vocab_size=300).save_pretrained(path)
    return load_tokenizer(path)
