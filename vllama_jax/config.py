"""Loading configs outside absl flags (tests, notebooks); the CLIs use ml_collections' `config_flags`."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

from vllama_jax.models.video_llama import VideoLlamaConfig


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'configs/video_llama.py:tiny' -> that file's get_config('tiny') (get_config() when no ':arg')."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec_obj = importlib.util.spec_from_file_location(f"_vllama_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec_obj)
    spec_obj.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def model_config(config: ml_collections.ConfigDict) -> VideoLlamaConfig:
    """The frozen model dataclass for `config.model` (raises on unknown keys)."""
    return VideoLlamaConfig.from_dict(config.model.to_dict())
