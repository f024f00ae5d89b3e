"""One media file as the model reads it at inference: a video's frames and their times, an image as a one-frame
video, a video's audio track as fbank clips (the original demo's `upload_video` / `upload_img` paths)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vllama_jax.data import audio, video


def video_frames(path: str | Path, num_frames: int, image_size: int) -> tuple[np.ndarray, list[float]]:
    """Uniformly sampled frames (T, S, S, 3), eval-normalised, and their times in seconds (for the prompt)."""
    indices, real = video.sample_indices_padded(video.count_frames(path), num_frames, "uniform")
    frames, fps = video.read_frames_seeking(str(path), indices, image_size)
    return video.normalize(frames), [float(i) / (fps or 1.0) for i in indices[:real]]


def image_frames(path: str | Path, image_size: int) -> np.ndarray:
    """An image as a one-frame video (1, S, S, 3): the original encodes images with T = 1."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from err
    return video.eval_transform(pixels[None], image_size)


def audio_clips(path: str | Path, clips_per_video: int = 8) -> np.ndarray:
    """The video's audio track as fbank clips (clips, 1, mel, frames); an error when it has none."""
    clips, has_audio = audio.load_audio_clips(str(path), clips_per_video, name=str(path))
    if not has_audio:
        raise ValueError(f"{path}: no audio track to listen to (drop --audio)")
    return clips
