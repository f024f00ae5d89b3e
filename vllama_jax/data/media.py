"""One media file as the model reads it, the one path every entry point takes (`vllama-chat`, `vllama-caption`,
the grain pipeline in eval mode and the feature cache through it, evaluation): a video's frames and their times
(decord's indices and pixels, `video_decode.py`), an image as a one-frame video (Pillow, `image.py`), a video's
audio track as fbank clips (`audio.py`). The original demo's `upload_video` / `upload_img` paths.

Every function takes a path or the encoded bytes (`name` then labels errors).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vllama_jax.data import audio, image, video


def video_frames(
    source: str | Path | bytes, num_frames: int, image_size: int, name: str | None = None
) -> tuple[np.ndarray, list[float]]:
    """Uniformly sampled frames (num_frames, S, S, 3), eval-normalised, and the real frames' times in seconds (for
    the prompt: index / average fps, as the original). A video shorter than num_frames repeats its last frame
    (`video.sample_indices_padded`)."""
    source = source if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    picked = {}

    def pick(count):
        picked["indices"], picked["real"] = video.sample_indices_padded(count, num_frames, "uniform")
        return picked["indices"]

    frames, _, fps = video.read_sampled(source, pick, image_size, name)
    seconds = [float(i) / (fps or 1.0) for i in picked["indices"][: picked["real"]]]
    return video.eval_transform(frames, image_size), seconds


def image_frames(source: str | Path | bytes, image_size: int, name: str | None = None) -> np.ndarray:
    """An image as a one-frame video (1, S, S, 3): the original encodes images with T = 1."""
    return image.eval_image(source, image_size, name)[None]


def audio_clips(path: str | Path, clips_per_video: int = 8) -> np.ndarray:
    """The video's audio track as fbank clips (clips, 1, mel, frames); an error when it has none."""
    clips, has_audio = audio.load_audio_clips(str(path), clips_per_video, name=str(path))
    if not has_audio:
        raise ValueError(f"{path}: no audio track to listen to (drop --audio)")
    return clips


def item_inputs(kind: str, source, image_size: int, num_frames: int, clips_per_video: int | None = None,
                name: str | None = None) -> dict:
    """One item's model inputs as `vllama-caption` reads a folder's file or a shard's bytes: {"frames", "seconds",
    "kind"} (seconds None for an image), and "audio" when clips_per_video is given (zeros when the video has no
    audio track, as in training)."""
    name = source if isinstance(source, str) else name
    if kind == "image":
        return {"frames": image_frames(source, image_size, name), "seconds": None, "kind": kind}
    frames, seconds = video_frames(source, num_frames, image_size, name)
    out = {"frames": frames, "seconds": seconds, "kind": kind}
    if clips_per_video is not None:
        out["audio"], _ = audio.load_audio_clips(source, clips_per_video, name=name or "<bytes>")
    return out

