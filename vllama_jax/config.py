"""Reading a config: load one outside absl flags (tests, notebooks; the CLIs use ml_collections' `config_flags`),
and resolve the typed records the code reads from it once (the model dataclass, the training branch)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from vllama_jax.models.lora import LoraConfig
from vllama_jax.models.video_llama import Branch, VideoLlamaConfig
from vllama_jax.models.video_llava import VideoLlavaConfig

# The model dataclass of each model family (`config.family`), and the top-level subtree holding its LLM.
MODEL_CONFIGS = {"video_llama": VideoLlamaConfig, "video_llava": VideoLlavaConfig}
LLM_SUBTREES = {"video_llama": "llama_model", "video_llava": "language_model"}

if TYPE_CHECKING:  # imported where a ConfigDict is made: the GPU check reads configs on machines without it
    import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'configs/video_llama.py:llm=tiny' -> that file's get_config('llm=tiny') (get_config() when no ':arg')."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec_obj = importlib.util.spec_from_file_location(f"_vllama_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec_obj)
    spec_obj.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def parse_arg(arg: str, positional: tuple[str, ...] = (), **defaults) -> ml_collections.ConfigDict:
    """A config file's argument string as named fields over `defaults` (big_vision's habit):
    "llm=tiny,recipe=vision_stage2" -> {llm: "tiny", recipe: "vision_stage2", <other defaults>}. Bare values fill
    the `positional` names in order ("tiny,vision_stage2", the old spelling). Values take their default's type
    (bool, int, float, str); an unknown name is refused with the known ones."""
    import ml_collections

    out = dict(defaults)
    bare = 0
    for part in filter(None, (p.strip() for p in arg.split(","))):
        name, eq, value = part.partition("=")
        if not eq:
            if bare >= len(positional):
                raise ValueError(f"config argument {arg!r}: {part!r} needs a name (known: {sorted(defaults)})")
            name, value, bare = positional[bare], part, bare + 1
        if name not in defaults:
            raise ValueError(f"config argument {arg!r}: unknown name {name!r} (known: {sorted(defaults)})")
        kind = type(defaults[name])
        out[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return ml_collections.ConfigDict(out)


def model_config(config: ml_collections.ConfigDict) -> VideoLlamaConfig | VideoLlavaConfig:
    """The frozen model dataclass of the config's family for `config.model` (raises on unknown keys)."""
    family = config.get("family", "video_llama")
    if family not in MODEL_CONFIGS:
        raise ValueError(f"unknown model family {family!r}: expected one of {sorted(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[family].from_dict(config.model.to_dict())


def branch(config: ml_collections.ConfigDict) -> Branch:
    """What the config's stage trains and reads (`train.branch`, `data.audio_source`), validated."""
    return Branch(config.train.branch, config.data.audio_source)


def lora_config(config: ml_collections.ConfigDict) -> LoraConfig:
    """The config's LoRA adapters (`config.lora`: rank, alpha, targets; rank 0 or no `lora` = none), on the
    family's LLM."""
    fields = config.get("lora")
    lora = LoraConfig.from_dict(fields.to_dict() if fields is not None else {})
    family = config.get("family", "video_llama")
    return LoraConfig(lora.rank, lora.alpha, lora.targets, LLM_SUBTREES[family]) if lora.subtree == "" else lora


def require_family(config: ml_collections.ConfigDict, tool: str, families: tuple[str, ...] = ("video_llama",)) -> None:
    """Refuse, naming the tool, a config of a model family the tool does not serve yet."""
    family = config.get("family", "video_llama")
    if family not in families:
        raise ValueError(
            f"{tool} does not take the {family} family yet (it serves {', '.join(families)}): see docs/{family}.md "
            f"for what exists (model, conversion, train step, planner)"
        )
