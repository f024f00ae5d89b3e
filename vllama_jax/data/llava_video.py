"""Video-LLaVA's media preprocessing, in numpy. Videos (LanguageBind's `processing_video.py`, decord backend):

frames at `np.linspace(0, n − 1, num_frames, dtype=int)` → /255 → CLIP mean/std → short side to 224 by PyTorch's
bilinear interpolation (align_corners=False, no antialiasing; pytorchvideo's ShortSideScale, which floors the
long side) → centre crop 224 (torchvision's CenterCropVideo rounding) → NHWC float32 (T, 224, 224, 3).

The original ends with RandomHorizontalFlipVideo(p=0.5) in the one transform that serves training *and*
evaluation, so its evaluation flips half the videos at random. Here the flip happens only when an rng is given
(`flip_rng`): off by default, on to reproduce the original's numbers.

Images (LanguageBind's `processing_image.py`, after train.py's `--image_aspect_ratio pad`): RGB → optionally padded
to a square of the CLIP mean colour (122, 116, 104), centred (`expand2square`) → ToTensor (/255) → torchvision's
Resize(224, bicubic) on the tensor (short side 224, long side truncated; no antialiasing, torchvision 0.15's
tensor default) → CenterCrop 224 → CLIP mean/std → (224, 224, 3) float32.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from vllama_jax.data.video import CLIP_MEAN, CLIP_STD, count_frames, normalize, read_frames_seeking, resize_bicubic

PAD_COLOUR = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104), as train.py computes it


def frame_indices(num_video_frames: int, num_frames: int = 8) -> np.ndarray:
    """The original's `np.linspace(0, n - 1, num_frames, dtype=int)` (first and last frame included)."""
    if num_video_frames <= 0:
        raise ValueError("video has no frames")
    return np.linspace(0, num_video_frames - 1, num_frames, dtype=int)


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of PyTorch's linear interpolation with align_corners=False (source index clamped at 0)."""
    scale = in_size / out_size
    src = np.maximum(scale * (np.arange(out_size) + 0.5) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(int), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = src - low
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.arange(out_size), low), 1 - frac)
    np.add.at(matrix, (np.arange(out_size), high), frac)
    matrix.flags.writeable = False
    return matrix


def short_side_scale(frames: np.ndarray, size: int = 224) -> np.ndarray:
    """(T, H, W, C) -> short side `size`, the long side floor(long / short · size), bilinear."""
    height, width = frames.shape[1:3]
    if width < height:
        new_h, new_w = int(np.floor(height / width * size)), size
    else:
        new_h, new_w = size, int(np.floor(width / height * size))
    rows, cols = _bilinear_matrix(height, new_h), _bilinear_matrix(width, new_w)
    resized = np.einsum("oh,thwc->towc", rows, frames.astype(np.float64))
    return np.einsum("towc,pw->topc", resized, cols).astype(np.float32)


def center_crop(frames: np.ndarray, size: int = 224) -> np.ndarray:
    height, width = frames.shape[1:3]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return frames[:, top:top + size, left:left + size]


def transform(frames_uint8: np.ndarray, size: int = 224, flip_rng: np.random.Generator | None = None) -> np.ndarray:
    """Decoded frames (T, H, W, 3) uint8 -> the model's input (T, size, size, 3) float32."""
    frames = center_crop(short_side_scale(normalize(frames_uint8), size), size)
    if flip_rng is not None and flip_rng.random() < 0.5:
        frames = frames[:, :, ::-1]
    return np.ascontiguousarray(frames)


def load_video(path: str | Path, num_frames: int = 8, size: int = 224,
               flip_rng: np.random.Generator | None = None) -> np.ndarray:
    """A video file -> (num_frames, size, size, 3) float32, as Video-LLaVA reads it."""
    indices = frame_indices(count_frames(path), num_frames)
    frames, _ = read_frames_seeking(path, indices, None)
    return transform(frames, size, flip_rng)


def expand_to_square(image, colour=PAD_COLOUR):
    """A PIL image centred on a square canvas of `colour` (the original's `expand2square`)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_image(path: str | Path, size: int = 224, pad: bool = False) -> np.ndarray:
    """An image file -> (size, size, 3) float32, as Video-LLaVA's image tower reads it (`pad`: train.py's
    `--image_aspect_ratio pad`, which its fine-tuning uses)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from err
    if pad:
        image = expand_to_square(image)
    pixels = np.asarray(image, np.float32)[None] / 255.0
    height, width = pixels.shape[1:3]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_h, new_w = (new_long, size) if width <= height else (size, new_long)
    resized = resize_bicubic(pixels, new_h, new_w).astype(np.float32)
    return normalize_unit(center_crop(resized, size))[0]


def normalize_unit(frames: np.ndarray) -> np.ndarray:
    """float frames in [0, 1] -> CLIP mean/std."""
    return ((frames - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)).astype(np.float32)
