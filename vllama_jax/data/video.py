"""Video frames for the model: pick frame indices as the original does, decode them as decord does, normalise.

The original (`video_llama/processors/video_processor.py`) decodes with decord, resizing to 224×224 while
decoding (aspect ratio not kept), then normalises with the CLIP mean and std. Decoding is `video_decode.py`
(`read_frames_seeking`, `read_frames` and `count_frames` are re-exported here).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

# the decoding entry points, re-exported so that callers keep one import
from vllama_jax.data.video_decode import count_frames, read_frames, read_frames_seeking, read_sampled  # noqa: F401

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_CROP_SCALE = (0.5, 1.0)  # the original train processor's RandomResizedCrop area fraction range


def frame_indices(
    num_video_frames: int, n_frms: int, sampling: str = "uniform", rng: np.random.Generator | None = None
):
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


def normalize(frames_uint8: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 CLIP-normalised."""
    x = frames_uint8.astype(np.float32) / 255.0
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def load_video(path: str | Path, n_frms: int, image_size: int, sampling: str = "uniform", rng=None) -> np.ndarray:
    """The original's `load_video` + eval processor: n_frms frames of `path` (min(n_frms, frame count) for a short
    video, as the original), decoded at image_size² and normalised, (n, S, S, 3) float32."""
    frames, _, _ = read_sampled(
        path, lambda count: frame_indices(count, min(n_frms, count), sampling, rng), image_size, str(path)
    )
    return eval_transform(frames, image_size)


def sample_indices_padded(num_video_frames: int, n_frms: int, sampling: str, rng=None) -> tuple[np.ndarray, int]:
    """Indices for exactly n_frms frames (static shapes) and how many are real.

    As the original, a video shorter than n_frms gives only its own frames (`n_frms = min(n_frms, vlen)`);
    the last index is then repeated to fill the rest (a repair the pipeline counts).
    """
    real = min(n_frms, num_video_frames)
    indices = frame_indices(num_video_frames, real, sampling, rng)
    real = len(indices)
    return np.concatenate([indices, np.full(n_frms - real, indices[-1], int)]), real


def random_resized_crop_params(
    height: int, width: int, rng: np.random.Generator, scale=TRAIN_CROP_SCALE, ratio=(3 / 4, 4 / 3)
):
    """(top, left, crop height, crop width) by torchvision's RandomResizedCrop rule: 10 tries of a random area
    fraction and log-uniform aspect ratio, then a central crop clamped to the ratio range."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@functools.lru_cache(maxsize=256)
def _bicubic_matrix(in_size: int, out_size: int, dtype=np.float64, a: float = -0.75) -> np.ndarray:
    """(out, in) weights of PyTorch's bicubic interpolation (align_corners=False, clamped borders, no antialias).

    Source coordinates and weights are computed in `dtype` with PyTorch's operation order: float32 for float32
    tensors, whose coordinate rounding alone moves results by up to ~4e-3 in 0..255 units against float64. The
    coordinate scale·(i + ½) − ½ is rounded once, as a fused multiply-add does (the installed PyTorch CPU build
    matches that best: 2e-4 instead of 2e-3 worst case on a 160x213 -> 224 resize)."""
    one, a = dtype(1), dtype(a)
    scale = dtype(in_size) / dtype(out_size)
    src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(dtype)
    base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - base.astype(dtype), 0, 1).astype(dtype)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=1).astype(np.float64)
    matrix = np.zeros((out_size, in_size))
    for tap in range(4):
        np.add.at(matrix, (np.arange(out_size), np.clip(base - 1 + tap, 0, in_size - 1)), weights[:, tap])
    matrix.flags.writeable = False  # kept for later calls of the same sizes (a crop's few sizes recur every step)
    return matrix


@functools.lru_cache(maxsize=256)
def _resize_path(shapes: tuple[tuple[int, ...], ...]) -> list:
    """numpy's contraction order for `resize_bicubic`'s einsum at these shapes, found once per shape."""
    return np.einsum_path("oh,thwc,pw->topc", *(np.empty(shape) for shape in shapes), optimize="greedy")[0]


def resize_bicubic(frames: np.ndarray, size, width: int | None = None) -> np.ndarray:
    """(T, H, W, C) uint8 or float -> (T, h, w, C) float64 as torch.nn.functional.interpolate(mode='bicubic',
    align_corners=False) computes it (a = −0.75, borders clamped, no antialiasing). `size` is an int (square
    output), an (h, w) pair, or h with `width` given. Weights follow PyTorch's float64 arithmetic for float64
    input and its float32 arithmetic otherwise (uint8 frames stand for the original's float32 frames); the sums
    are taken in float64."""
    if width is not None:
        height = int(size)
    elif np.ndim(size) == 0:
        height = width = int(size)
    else:
        height, width = (int(s) for s in size)
    dtype = np.float64 if frames.dtype == np.float64 else np.float32
    rows = _bicubic_matrix(frames.shape[1], height, dtype)
    cols = _bicubic_matrix(frames.shape[2], width, dtype)
    path = _resize_path((rows.shape, frames.shape, cols.shape))
    return np.einsum("oh,thwc,pw->topc", rows, frames.astype(np.float64), cols, optimize=path)


def to_uint8(frames: np.ndarray, wrap: bool = True) -> np.ndarray:
    """Float frames -> uint8 as the original's `.to(torch.uint8)` casts them: truncated toward zero, and values
    outside 0..255 (bicubic overshoot at hard edges) wrap around modulo 256 (−3 becomes 253, 258 becomes 2).
    `wrap=False` is the clean variant: clip to 0..255 first (a dark pixel next to a bright edge stays dark)."""
    if not wrap:
        return np.clip(frames, 0, 255).astype(np.uint8)
    return (np.trunc(frames).astype(np.int64) & 255).astype(np.uint8)


def train_transform(
    frames_uint8: np.ndarray,
    rng: np.random.Generator,
    image_size: int,
    scale: tuple[float, float] = TRAIN_CROP_SCALE,
    wrap_uint8: bool = True,
) -> np.ndarray:
    """The original `alpro_video_train` on frames decoded at image_size² (decord's resize): one RandomResizedCrop
    box (area fraction `scale`, the original's 0.5–1; ratio 3/4–4/3) for the whole clip, bicubic back to
    image_size² as PyTorch computes it (no antialiasing), cast to uint8 (`to_uint8`: wrapping as the original
    unless `wrap_uint8` is False), /255, CLIP-normalise. float32 out."""
    top, left, h, w = random_resized_crop_params(frames_uint8.shape[1], frames_uint8.shape[2], rng, scale=scale)
    crop = frames_uint8[:, top : top + h, left : left + w]
    return normalize(to_uint8(resize_bicubic(crop, image_size), wrap_uint8))


def train_transform_native(
    frames_uint8: np.ndarray, rng: np.random.Generator, image_size: int, scale: tuple[float, float] = TRAIN_CROP_SCALE
) -> np.ndarray:
    """The clean variant of `train_transform` (not the original's): the crop box is drawn on the frames at their
    native size and each crop is resized once, by Pillow's antialiased bicubic as the original's image path does,
    instead of cropping frames already squashed to image_size² and scaling the crop back up. float32 out."""
    from PIL import Image

    top, left, h, w = random_resized_crop_params(frames_uint8.shape[1], frames_uint8.shape[2], rng, scale=scale)
    crops = [
        np.asarray(Image.fromarray(frame[top : top + h, left : left + w]).resize((image_size, image_size),
                                                                                Image.BICUBIC))
        for frame in frames_uint8
    ]
    return normalize(np.stack(crops))


def eval_transform(frames_uint8: np.ndarray, image_size: int | None = None) -> np.ndarray:
    """The original `alpro_video_eval`: frames decoded at image_size² already (`read_frames_seeking`) -> /255 ->
    CLIP-normalise. Frames of another size are refused: resizing here would not be decord's resize."""
    if image_size is not None and frames_uint8.shape[1:3] != (image_size, image_size):
        raise ValueError(f"eval_transform: frames of {frames_uint8.shape[1:3]} given for {image_size}²; decode them "
                         f"at that size (read_frames_seeking(..., image_size)), as the original's decord does")
    return normalize(frames_uint8)
