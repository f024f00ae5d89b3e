"""The PyTorch files people have, opened lazily and named in the full Video-LLaMA key space.

Every source becomes {Video-LLaMA key: Tensor}, where a Tensor knows its shape and dtype from the file's header
(or a memory-mapped torch tensor) and reads its values only when asked. So a converter can check every key, shape
and dtype before reading a byte, and hold one tensor at a time.

Recognised (by content, not by file name):
- a Video-LLaMA or BLIP-2 (LAVIS) checkpoint: a `.pth` with `{'model': state_dict}` or a bare state dict whose
  keys carry the original prefixes (`visual_encoder.`, `ln_vision.`, `Qformer.`, `query_tokens`, `llama_proj.`,
  `llama_model.`, `video_Qformer.`, `audio_…`);
- `eva_vit_g.pth`: the bare EVA ViT-g state dict (`cls_token`, `blocks.N.…`), imported under `visual_encoder.`;
- a Hugging Face Llama directory: `config.json` with `*.safetensors` or `pytorch_model*.bin` (sharded with an
  index file, or one file), imported under `llama_model.`;
- `imagebind_huge.pth`: the bare ImageBind state dict (`modality_preprocessors.…`, `modality_trunks.…`),
  imported under `audio_encoder.` (its text, depth, thermal and IMU modalities are dropped on purpose).
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vllama_jax.convert.mapping import to_numpy

VIDEO_LLAMA_PREFIXES = ("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens", "video_frame_position_embedding.",
                        "video_Qformer.", "video_query_tokens", "llama_proj.", "llama_model.", "audio_")

# Dropped on purpose, by source kind (regexes over the Video-LLaMA key):
DROPPED = {
    # BLIP-2's heads for its own pretraining and its T5/OPT bridge, unused by Video-LLaMA
    "original": (r"t5_proj\..*", r"opt_proj\..*", r"vision_proj\..*", r"text_proj\..*", r"itm_head\..*", r"temp",
                 r"llm_proj\..*"),
    # the original builds a 39-block ViT without a final norm or head and loads this file with strict=False,
    # which skips whatever the file holds beyond that
    "eva_vit": (r"visual_encoder\.blocks\.(39|[4-9]\d)\..*", r"visual_encoder\.(norm|fc_norm|head)\..*"),
    "hf_llama": (),
    "imagebind": (),  # the unused modalities are in the model-wide UNUSED_KEYS (convert/imagebind.py)
}


@dataclasses.dataclass
class Tensor:
    """One tensor of a source file: shape and dtype known, values read by `load()`."""

    shape: tuple[int, ...]
    dtype: np.dtype
    source: str
    key: str  # the key inside its file
    _load: Callable[[], np.ndarray]

    def load(self) -> np.ndarray:
        array = self._load()
        if tuple(array.shape) != self.shape:
            raise ValueError(f"{self.source}: {self.key} holds {array.shape}, its header says {self.shape}")
        return array


def _torch_dtype(dtype) -> np.dtype:
    import ml_dtypes

    name = str(dtype).removeprefix("torch.")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _read_pth(path: Path) -> dict[str, Tensor]:
    """A `.pth` / `.bin` (zip-format torch.save), memory-mapped: nothing is read until a tensor is loaded."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (or {{'model': state_dict}}) of tensors")
    return {
        k: Tensor(tuple(v.shape), _torch_dtype(v.dtype), str(path), k, lambda v=v: to_numpy(v)) for k, v in obj.items()
    }


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """A `.safetensors` file: shapes and dtypes from its JSON header, read once; each tensor read on its own
    when loaded."""
    try:
        data_start, header = _safetensors_header(path)
        dtypes = {k: _SAFETENSORS_DTYPES[v["dtype"]] for k, v in header.items()}
    except Exception as err:  # noqa: BLE001 - any header problem means the file is unusable
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    size = path.stat().st_size
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if data_start + end > size:
        raise ValueError(f"{path}: truncated (the header describes {end} data bytes, the file is {size} bytes)")
    return {
        k: Tensor(
            tuple(v["shape"]),
            dtypes[k],
            str(path),
            k,
            lambda k=k, v=v: _safetensors_tensor(
                path, k, data_start + v["data_offsets"][0], data_start + v["data_offsets"][1], dtypes[k]
            ).reshape(v["shape"]),
        )
        for k, v in header.items()
    }


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, {key: {dtype, shape, data_offsets}})."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def _safetensors_tensor(path: Path, key: str, begin: int, end: int, dtype: np.dtype) -> np.ndarray:
    """Bytes [begin, end) of the file, read straight into a flat array (one copy, no intermediate bytes)."""
    out = np.empty(end - begin, np.uint8)
    with open(path, "rb") as f:
        f.seek(begin)
        if f.readinto(out) != end - begin:
            raise ValueError(f"{path}: {key} is truncated")
    return out.view(dtype)


def _safetensors_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {
        "F64": np.dtype(np.float64),
        "F32": np.dtype(np.float32),
        "F16": np.dtype(np.float16),
        "BF16": np.dtype(ml_dtypes.bfloat16),
        "I64": np.dtype(np.int64),
        "I32": np.dtype(np.int32),
        "I16": np.dtype(np.int16),
        "I8": np.dtype(np.int8),
        "U8": np.dtype(np.uint8),
        "BOOL": np.dtype(bool),
    }


_SAFETENSORS_DTYPES = _safetensors_dtypes()


@dataclasses.dataclass
class Source:
    """One input (file or Hugging Face directory): its kind and its tensors keyed in the Video-LLaMA key space,
    grouped by the file that holds them (a converter reads one group at a time)."""

    path: Path
    kind: str  # "original" | "eva_vit" | "hf_llama" | "imagebind"
    files: dict[str, dict[str, Tensor]]  # file -> {Video-LLaMA key: Tensor}

    @property
    def tensors(self) -> dict[str, Tensor]:
        return {k: t for group in self.files.values() for k, t in group.items()}


def _hf_llama_files(directory: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (directory / f).exists()]
            if missing:
                raise FileNotFoundError(f"{index}: shard files missing: {', '.join(missing)}")
            return [directory / f for f in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).exists():
            return [directory / name]
    raise FileNotFoundError(f"{directory}: no model.safetensors(.index.json) or pytorch_model(.bin.index.json)")


def open_source(path: str | Path) -> Source:
    """Open one input lazily and name its tensors in the Video-LLaMA key space."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: a directory source must be a Hugging Face Llama folder with config.json")
        files = {}
        for file in _hf_llama_files(path):
            raw = _read_safetensors(file) if file.suffix == ".safetensors" else _read_pth(file)
            files[str(file)] = {f"llama_model.{k}": t for k, t in raw.items()}
        return Source(path, "hf_llama", files)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raw = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pth(path)
    if any(k.startswith(VIDEO_LLAMA_PREFIXES) for k in raw):
        return Source(path, "original", {str(path): raw})
    if "cls_token" in raw and any(k.startswith("blocks.") for k in raw):
        return Source(path, "eva_vit", {str(path): {f"visual_encoder.{k}": t for k, t in raw.items()}})
    if any(k.startswith(("model.layers.", "model.embed_tokens")) for k in raw):
        return Source(path, "hf_llama", {str(path): {f"llama_model.{k}": t for k, t in raw.items()}})
    if any(k.startswith(("modality_preprocessors.", "modality_trunks.")) for k in raw):
        return Source(path, "imagebind", {str(path): {f"audio_encoder.{k}": t for k, t in raw.items()}})
    sample = ", ".join(sorted(raw)[:5])
    raise ValueError(f"{path}: unrecognised checkpoint layout (first keys: {sample})")


def dropped_patterns(kind: str) -> list[re.Pattern]:
    return [re.compile(p) for p in DROPPED[kind]]
