"""Video frames for the model: pick frame indices as the original does, decode them with PyAV, normalise.

The original (`video_llama/processors/video_processor.py`) decodes with decord, resizing to 224×224 while
decoding (aspect ratio not kept), then normalises with the CLIP mean and std.
"""
from __future__ import annotations

import io
import math
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

    The simple reference: every frame up to the last wanted one is decoded in stream order (those not asked
    for skip colour conversion). `read_frames_seeking` gives the same pixels without decoding the whole clip.
    """
    wanted: dict[int, list[int]] = {}
    for k, i in enumerate(indices):  # an index may repeat (short videos are padded by repeating a frame)
        wanted.setdefault(int(i), []).append(k)
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
    frames, _ = read_frames_seeking(path, indices, image_size)
    return normalize(frames)


def sample_indices_padded(num_video_frames: int, n_frms: int, sampling: str, rng=None) -> tuple[np.ndarray, int]:
    """Indices for exactly n_frms frames (static shapes) and how many are real.

    As the original, a video shorter than n_frms gives only its own frames (`n_frms = min(n_frms, vlen)`);
    the last index is then repeated to fill the rest (a repair the pipeline counts).
    """
    real = min(n_frms, num_video_frames)
    indices = frame_indices(num_video_frames, real, sampling, rng)
    real = len(indices)
    return np.concatenate([indices, np.full(n_frms - real, indices[-1], int)]), real


def read_frames_seeking(source, indices, image_size: int | None, name: str | None = None) -> tuple[np.ndarray, float]:
    """Frames at `indices` (any order, repeats allowed) as uint8 (len, S, S, 3), or at native size when
    image_size is None; and the average fps. `source` is a path or the encoded bytes (`name` labels errors).

    Seeks to the keyframe before each wanted frame instead of decoding the whole stream, and keeps decoding
    forward when the next wanted frame is near. A frame's index is its presentation time × the average frame
    rate, which is its position in the stream for constant-frame-rate video (what decord's index means there).
    """
    label = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>")
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        raise ValueError(f"{label}: no frame indices given")
    found: dict[int, np.ndarray] = {}
    try:
        with av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)) as container:
            if not container.streams.video:
                raise ValueError(f"{label}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            if fps <= 0:
                raise ValueError(f"{label}: unknown frame rate")
            time_base = float(stream.time_base)
            start = stream.start_time or 0
            near = max(2, int(2 * fps))  # decode forward rather than seek across less than ~2 s

            def index_of(frame):
                pts = frame.pts if frame.pts is not None else 0
                return int(round((pts - start) * time_base * fps))

            def convert(frame):
                if image_size is None:
                    return frame.to_ndarray(format="rgb24")
                return frame.to_ndarray(width=image_size, height=image_size, format="rgb24")

            position, frames = None, None
            for target in wanted:
                if position is None or target <= position or target - position > near:
                    container.seek(int(start + target / fps / time_base), stream=stream, backward=True, any_frame=False)
                    frames, position = container.decode(stream), None
                for frame in frames:
                    position = index_of(frame)
                    if position >= target:
                        break
                if position is None or position < target:
                    raise ValueError(f"{label}: frame {target} is past the end of the video")
                if position > target:  # the seek landed after the wanted frame: decode from the start instead
                    container.seek(start, stream=stream, backward=True, any_frame=False)
                    frames = container.decode(stream)
                    for frame in frames:
                        position = index_of(frame)
                        if position >= target:
                            break
                if position != target:
                    raise ValueError(f"{label}: frame {target} not found (stream jumps from before it to {position})")
                found[target] = convert(frame)
    except av.error.FFmpegError as err:
        raise ValueError(f"{label}: cannot decode video ({err})") from err
    return np.stack([found[int(i)] for i in indices]), fps


def random_resized_crop_params(height: int, width: int, rng: np.random.Generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
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


def _bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """(out, in) weights of PyTorch's bicubic interpolation (align_corners=False, clamped borders, no antialias)."""
    scale = in_size / out_size
    src = (np.arange(out_size) + 0.5) * scale - 0.5
    base = np.floor(src).astype(int)
    t = src - base
    weights = np.stack([
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    ], axis=1)
    matrix = np.zeros((out_size, in_size))
    for tap in range(4):
        np.add.at(matrix, (np.arange(out_size), np.clip(base - 1 + tap, 0, in_size - 1)), weights[:, tap])
    return matrix


def resize_bicubic(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, H, W, C) -> (T, height, width, C) float64, as torch.nn.functional.interpolate(mode='bicubic')."""
    rows = _bicubic_matrix(frames.shape[1], height)
    cols = _bicubic_matrix(frames.shape[2], width)
    return np.einsum("oh,thwc,pw->topc", rows, frames.astype(np.float64), cols, optimize=True)


def train_transform(frames_uint8: np.ndarray, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """The original train processor: one RandomResizedCrop box (scale 0.5-1) for the whole clip, bicubic back
    to image_size, cast to uint8, CLIP-normalise. The original's float->uint8 cast wraps out-of-range values
    (bicubic overshoot); here they are clipped to 0..255 first, then truncated like the cast."""
    top, left, h, w = random_resized_crop_params(frames_uint8.shape[1], frames_uint8.shape[2], rng)
    crop = frames_uint8[:, top:top + h, left:left + w]
    resized = resize_bicubic(crop, image_size, image_size)
    return normalize(np.clip(resized, 0, 255).astype(np.uint8))


def eval_transform(frames_uint8: np.ndarray, image_size: int) -> np.ndarray:
    """Resize only (frames are normally decoded at image_size already), then CLIP-normalise."""
    if frames_uint8.shape[1:3] != (image_size, image_size):
        frames_uint8 = np.clip(resize_bicubic(frames_uint8, image_size, image_size), 0, 255).astype(np.uint8)
    return normalize(frames_uint8)
