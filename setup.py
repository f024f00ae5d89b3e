"""Install vllama-jax: `pip install -e .` (add `[test]` for the PyTorch references and pytest)."""
from setuptools import find_packages, setup

setup(
    name="vllama_jax",
    version="0.1.0",
    description="Video-LLaMA in JAX/Flax: audio-visual language model for TPU pods, GPUs and CPUs.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.14",
    packages=find_packages(include=["vllama_jax", "vllama_jax.*"]),
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.12,<0.3",
        "tensorflow-datasets>=4.9.9,<5",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "safetensors>=0.5",
        "librosa>=0.11,<0.12",
        "ml-collections>=1.0,<2",
        "av>=14,<19",
        "array-record>=0.7,<0.9",
        "numpy>=1.26,<3",
        "absl-py>=2.0",
        "msgpack>=1.0",
        "ml-dtypes>=0.5",  # bfloat16 arrays in numpy (frozen-feature shards)
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "pycocoevalcap>=1.2,<1.3",  # vllama-eval: BLEU, ROUGE-L, CIDEr-D (and PTB/METEOR with java) as COCO scores them
        "pyarrow>=14",  # vllama-eval: Video-MME is released as parquet
    ],
    extras_require={
        # libtpu, the TPU compiler: `vllama-plan --topology` compiles for a TPU slice's abstract chips with it, on
        # any machine (no TPU needed). jax[tpu] pins the libtpu built for its own jax version.
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        # einops, ftfy, regex, iopath: what ImageBind's model files import (the reference in
        # vllama_jax/testing/imagebind_reference.py)
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.6",
            "torch==2.13.0",
            "einops>=0.7",
            "ftfy>=6",
            "regex",
            "iopath>=0.1.9",
            "ruff==0.17.6",
            "decord==0.6.0",  # the original's video reader: the frame reference in tests, never a package dependency
            "jax[tpu]>=0.10.2,<0.11",  # the TPU compiler, for tests/unit/test_tpu_topology.py
        ],  # ruff: the style rules (pyproject.toml), checked by tests/unit/test_repository.py
    },
    entry_points={
        "console_scripts": [
            "vllama-demo=vllama_jax.demo:cli",
            "vllama-prepare=vllama_jax.data.prepare_main:cli",
            "vllama-train=vllama_jax.train.main:cli",
            "vllama-cache=vllama_jax.train.cache_main:cli",
            "vllama-convert=vllama_jax.convert.main:cli",
            "vllama-chat=vllama_jax.infer.chat:cli",
            "vllama-caption=vllama_jax.infer.caption:cli",
            "vllama-plan=vllama_jax.plan:cli",
            "vllama-eval=vllama_jax.eval.main:cli",
        ],
    },
)
