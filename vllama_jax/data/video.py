"""Video frames for the model: pick frame indices as the original does, decode them with PyAV, normalise.

The original (`video_llama/processors/video_processor.py`) decodes with decord, resizing to 224×224 while
decoding (aspect ratio not kept), then normalises with the CLIP mean and std.
"""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def frame_indices(num_video_frames: int, n_frms: int, sampling: str = "uniform", rng: np.random.Generator | None = None):
    """`uniform`: arange(0, n, n / n_frms) cast to int. `headtail`: n_frms/2 sorted random indices from each
    half of the video (needs `rng`)."""
    if num_video_frames <= 0:
        raise ValueError("video has no frames")
    if sampling == "uniform":
        return np.arange(0, num_video_frames, num_video_frames / n_frms).astype(int)[:n_frms]
    if sampling == "headtail":
        if rng is None:
            raise ValueError("headtail sampling needs an rng")
        half = num_video_frames // 2
        head = np.sort(rng.choice(half, n_frms // 2, replace=False))
        tail = np.sort(rng.choice(np.arange(half, num_video_frames), n_frms - n_frms // 2, replace=False))
        return np.concatenate([head, tail])
    raise ValueError(f"unknown frame sampling {sampling!r}: expected 'uniform' or 'headtail'")


def read_frames(path: str | Path, indices, image_size: int) -> tuple[np.ndarray, float]:
    """Decode the frames at `indices` resized to image_size², as uint8 (len(indices), H, W, 3); and the fps.

    Frames are decoded in stream order and those not asked for are dropped without colour conversion.
    """
    wanted = {int(i): k for k, i in enumerate(indices)}
    out = np.zeros((len(indices), image_size, image_size, 3), np.uint8)
    found = set()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0.0)
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    out[wanted[i]] = frame.to_ndarray(width=image_size, height=image_size, format="rgb24")
                    found.add(i)
                if len(found) == len(wanted):
                    break
    except (av.error.FFmpegError, IndexError) as err:
        raise ValueError(f"{path}: cannot decode video ({err})") from err
    missing = sorted(set(wanted) - found)
    if missing:
        raise ValueError(f"{path}: frames {missing[:5]} are past the end of the video")
    return out, fps


def count_frames(path: str | Path) -> int:
    """Frame count from the container header, or by demuxing packets when the header does not say."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)


def normalize(frames_uint8: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 CLIP-normalised."""
    x = frames_uint8.astype(np.float32) / 255.0
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def load_video(path: str | Path, n_frms: int, image_size: int, sampling: str = "uniform", rng=None) -> np.ndarray:
    """The eval-processor path: n_frms frames of `path`, resized and normalised, (n_frms, H, W, 3) float32."""
    indices = frame_indices(count_frames(path), n_frms, sampling, rng)
    frames, _ = read_frames(path, indices, image_size)
    return normalize(frames)
