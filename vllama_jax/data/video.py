"""Video frames for the model: pick frame indices as the original does, decode them with PyAV, normalise.

The original (`video_llama/processors/video_processor.py`) decodes with decord, resizing to 224×224 while
decoding (aspect ratio not kept), then normalises with the CLIP mean and std.
"""
from __future__ import annotations

import bisect
import functools
import io
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

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
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        raise ValueError(f"{path}: cannot open video ({err})") from err
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
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


def _source_label(source, name: str | None) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes> {name}" if name else "<bytes>"
    return f"{source} ({name})" if name and name != str(source) else str(source)


def _open(source):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(source))
    return av.open(str(source))


class _SeekingDecoder:
    """Frames of one video stream by index, seeking only when that saves decoding.

    A frame's index is round((pts − start_time) · time_base · average fps). To reach frame t it either keeps
    decoding forward from the current position p (when no keyframe lies in (p, t], i.e. t is in the GOP being
    decoded) or seeks to the keyframe at or before t's presentation time. After a seek, frames output before
    the first keyframe (open-GOP leading pictures, whose references were skipped) are not trusted; if the first
    trusted frame is already past t the seek landed too late (demuxers seek on decode time stamps), and it
    backs off further, doubling the step, down to decoding from the start of the stream. That last resort
    reopens the file rather than seeking to its start (MPEG-TS seeks on decode time stamps land late), so it
    decodes exactly what `read_frames` does. `reopen` gives a fresh container of the same file.
    """

    def __init__(self, container, label: str, reopen=None):
        stream = container.streams.video[0]
        self.container, self.stream, self.label, self.reopen = container, stream, label, reopen
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise ValueError(f"{label}: unknown frame rate")
        self.rate = Fraction(rate)
        self.time_base = Fraction(stream.time_base)
        self.start = stream.start_time if stream.start_time is not None else 0
        self.keyframes = self._indexed_keyframes()
        self.seen_keyframes: list[int] = []
        self.frames = None  # the decode generator of the current run
        self.position: int | None = None  # index of the last frame output in the current run
        self.trusted = False  # a keyframe has been output since the last seek
        self.from_start = False  # the current run started at the beginning of the stream
        self.unseekable = False  # a seek failed (no index, e.g. an empty AVI): only decode from the start on
        self.decoded_any = False
        self.decoded_frames = 0  # for tests and the benchmark
        self.seeks = 0

    def _indexed_keyframes(self) -> list[int] | None:
        """Keyframe indices from the container's index (mp4, mkv with cues), or None when it has none or only
        part of the stream. Index timestamps are decode times; they are shifted by the first frame's
        decode-to-presentation delay, so this is an estimate used only to choose between seeking and decoding on."""
        entries = self.stream.index_entries
        count = len(entries)
        if count == 0 or (self.stream.frames and count < self.stream.frames):
            return None
        shift = self.start - entries[0].timestamp
        return [self.index_of(e.timestamp + shift) for e in entries if e.is_keyframe]

    def index_of(self, pts: int) -> int:
        return round((pts - self.start) * self.time_base * self.rate)

    def timestamp_of(self, index: int) -> int:
        return int(self.start + Fraction(index) / self.rate / self.time_base)

    def _keyframe_between(self, low: int, high: int) -> bool:
        """Whether a keyframe is (known or expected to be) at an index in (low, high]."""
        if self.keyframes is not None:
            i = bisect.bisect_right(self.keyframes, low)
            return i < len(self.keyframes) and self.keyframes[i] <= high
        seen = self.seen_keyframes
        if len(seen) >= 2:  # no index: expect the next keyframe one (largest seen) GOP after the last one
            gop = max(b - a for a, b in zip(seen, seen[1:]))
            upcoming = seen[-1] + gop
            while upcoming <= low:
                upcoming += gop
            return upcoming <= high
        return high - low > max(2, int(2 * self.rate))  # GOP unknown yet: assume about 2 s

    def _seek(self, index: int | None):
        """Seek to the keyframe at or before frame `index`, or go back to the start of the stream when None (also
        when the container cannot seek)."""
        if index is not None and not self.unseekable:
            try:
                self.container.seek(self.timestamp_of(index), stream=self.stream, backward=True, any_frame=False)
            except av.error.FFmpegError:
                self.unseekable = True
        if index is None or self.unseekable:
            index = None
            if self.reopen is not None:
                self.container.close()
                self.container = self.reopen()
                self.stream = self.container.streams.video[0]
            else:
                self.container.seek(self.start, stream=self.stream, backward=True, any_frame=False)
        self.frames = self.container.decode(self.stream)
        self.position, self.trusted, self.from_start = None, index is None, index is None
        self.seeks += 1

    def _next(self):
        """The next trusted frame of the current run and its index, or (None, None) at the end of the stream."""
        for frame in self.frames:
            self.decoded_any = True
            self.decoded_frames += 1
            if frame.pts is None:
                if self.position is None:
                    raise ValueError(f"{self.label}: a frame has no time stamp")
                index = self.position + 1
            else:
                index = self.index_of(frame.pts)
            if frame.key_frame and (not self.seen_keyframes or index > self.seen_keyframes[-1]):
                self.seen_keyframes.append(index)
            self.trusted = self.trusted or frame.key_frame
            if self.trusted:
                self.position = index
                return frame, index
        return None, None

    def get(self, target: int):
        if (
            self.position is None
            or target <= self.position
            or (not self.unseekable and self._keyframe_between(self.position, target))
        ):
            self._seek(target)
        back = max(1, int(self.rate))  # first back-off: 1 s before the target
        while True:
            frame, index = self._next()
            while frame is not None and index < target:
                frame, index = self._next()
            if frame is not None and index == target:
                return frame
            if frame is None and self.from_start:
                if not self.decoded_any:
                    raise ValueError(f"{self.label}: the video has no frames")
                raise ValueError(
                    f"{self.label}: frame {target} is past the end of the video (last frame {self.position})"
                )
            if frame is None and self.decoded_any and self.position is not None:
                raise ValueError(
                    f"{self.label}: frame {target} is past the end of the video (last frame {self.position})"
                )
            if frame is not None and self.from_start:
                raise ValueError(
                    f"{self.label}: frame {target} not found (the stream jumps from before it to "
                    f"frame {index}; variable frame rate?)"
                )
            # landed after the target, or got nothing: seek further back, at the start at the latest
            if target - back > 0:
                self._seek(target - back)
                back *= 2
            else:
                self._seek(None)


def read_frames_seeking(source, indices, image_size: int | None, name: str | None = None) -> tuple[np.ndarray, float]:
    """Frames at `indices` (any order, repeats allowed) as uint8 (len, S, S, 3) with S = image_size (aspect ratio
    not kept, as the original's decord reader), or at native size when image_size is None; and the average fps.

    `source` is a path or the encoded file as bytes; errors are ValueErrors naming it ('<bytes>' plus `name`).
    Seeks to the keyframe before a wanted frame instead of decoding the whole stream, and decodes on when the
    next wanted frame is in the GOP being decoded (see `_SeekingDecoder`); only wanted frames are converted to
    RGB. A frame's index is its presentation time × the average frame rate, its position in the stream for
    constant-frame-rate video (what decord's index and `read_frames`' count mean there); the pixels equal
    `read_frames`' for the same indices.
    """
    label = _source_label(source, name)
    order = [int(i) for i in np.asarray(indices).reshape(-1)]
    if not order:
        raise ValueError(f"{label}: no frame indices given")
    if min(order) < 0:
        raise ValueError(f"{label}: negative frame index {min(order)}")
    found: dict[int, np.ndarray] = {}
    container = decoder = None
    try:
        container = _open(source)
        if not container.streams.video:
            raise ValueError(f"{label}: no video stream")
        decoder = _SeekingDecoder(container, label, reopen=lambda: _open(source))
        for target in sorted(set(order)):
            frame = decoder.get(target)
            if image_size is None:
                found[target] = frame.to_ndarray(format="rgb24")
            else:
                found[target] = frame.to_ndarray(width=image_size, height=image_size, format="rgb24")
        fps = float(decoder.rate)
    except av.error.FFmpegError as err:
        raise ValueError(f"{label}: cannot decode video ({err})") from err
    finally:
        if decoder is not None:
            decoder.container.close()  # the one it reopened, if it did
        elif container is not None:
            container.close()
    return np.stack([found[i] for i in order]), fps


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


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    # The original casts with `.to(torch.uint8)`, which truncates toward zero and wraps values outside 0..255
    # (bicubic overshoot: −3 becomes 253, 258 becomes 2). The wrap-around is NOT reproduced: values are clipped
    # to 0..255 first, then truncated toward zero like the cast.
    return np.clip(frames, 0, 255).astype(np.uint8)


def train_transform(
    frames_uint8: np.ndarray, rng: np.random.Generator, image_size: int, scale: tuple[float, float] = TRAIN_CROP_SCALE
) -> np.ndarray:
    """The original `alpro_video_train`: one RandomResizedCrop box (area fraction `scale`, the original's
    0.5–1; ratio 3/4–4/3) for the whole clip, bicubic back to image_size², cast to uint8 (see `_to_uint8`), /255,
    CLIP-normalise. float32 out."""
    top, left, h, w = random_resized_crop_params(frames_uint8.shape[1], frames_uint8.shape[2], rng, scale=scale)
    crop = frames_uint8[:, top : top + h, left : left + w]
    return normalize(_to_uint8(resize_bicubic(crop, image_size)))


def eval_transform(frames_uint8: np.ndarray, image_size: int | None = None) -> np.ndarray:
    """The original `alpro_video_eval`: frames decoded at image_size² already -> /255 -> CLIP-normalise. Frames of
    another size (when image_size is given) are first resized bicubically."""
    if image_size is not None and frames_uint8.shape[1:3] != (image_size, image_size):
        frames_uint8 = _to_uint8(resize_bicubic(frames_uint8, image_size))
    return normalize(frames_uint8)
