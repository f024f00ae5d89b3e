"""The original's media preprocessing as references for tests, and test media with real-world features.

- `original_load_video`: Video-LLaMA's `load_video(path, n_frms, 224, 224, "uniform")` + `AlproVideoEvalProcessor`
  on decord 0.6.0 (the test extra; never a dependency of the package).
- `blip2_image_eval`: `Blip2ImageEvalProcessor` without torchvision: its `Resize((S, S), BICUBIC)` on a PIL image is
  Pillow's `resize`, `ToTensor` is /255 in CHW, then `Normalize`.
- `torchaudio_resample`: torchaudio's `functional.resample` (`sinc_interp_hann`) restated in torch, since
  torchaudio has no build for the installed torch.
- `write_feature_video`: H.264 clips with B-frames, non-square pixels, odd sizes, rotation, variable frame rate.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def decord_frames(path, indices, size: int | None = 224) -> np.ndarray:
    """decord's frames (T, H, W, 3) uint8 at `indices`, resized by decord to size² (native when None)."""
    import decord

    kwargs = {} if size is None else {"width": size, "height": size}
    reader = decord.VideoReader(str(path), **kwargs)
    return reader.get_batch(list(indices)).asnumpy()


def original_load_video(path, n_frms: int = 8, size: int = 224) -> tuple[np.ndarray, list[int], float]:
    """The original chat path for a video: decord, uniform indices, eval processor. Returns the normalised frames
    (T, H, W, 3) float32, the frame indices and decord's average fps."""
    import decord

    reader = decord.VideoReader(str(path), width=size, height=size)
    vlen = len(reader)
    n_frms = min(n_frms, vlen)
    indices = np.arange(0, vlen, vlen / n_frms).astype(int).tolist()
    frames = torch.from_numpy(reader.get_batch(indices).asnumpy()).permute(3, 0, 1, 2).float()  # C, T, H, W
    frames = frames.to(torch.uint8).permute(1, 2, 3, 0).float() / 255.0  # ToUint8, ToTHWC, ToTensorVideo
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    return ((frames - mean) / std).numpy(), indices, float(reader.get_avg_fps())


def blip2_image_eval(path, size: int = 224) -> np.ndarray:
    """The original image path: PIL open, RGB, Resize((S, S), bicubic), ToTensor, Normalize -> (S, S, 3)."""
    from PIL import Image

    with Image.open(path) as img:
        resized = img.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    return x.permute(1, 2, 0).numpy()


def torchaudio_resample(waveform: np.ndarray, orig_freq: int, new_freq: int, lowpass_filter_width: int = 6,
                        rolloff: float = 0.99) -> np.ndarray:
    """torchaudio.functional.resample(waveform, orig_freq, new_freq) with resampling_method 'sinc_interp_hann', in
    float32 as ImageBind calls it on torchaudio.load's output."""
    wave = torch.as_tensor(np.asarray(waveform, np.float32))
    if orig_freq == new_freq:
        return wave.numpy()
    gcd = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // gcd, int(new_freq) // gcd
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float32)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float32)[:, None, None] / new + idx
    t = (t * base).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.tensor(1.0), t.sin() / t) * window * (base / orig)
    shape = wave.shape
    flat = wave.reshape(-1, shape[-1])
    padded = torch.nn.functional.pad(flat, (width, width + orig))
    out = torch.nn.functional.conv1d(padded[:, None], kernel, stride=orig).transpose(1, 2).reshape(flat.shape[0], -1)
    target = math.ceil(new * shape[-1] / orig)
    return out[..., :target].reshape(*shape[:-1], -1).numpy()


def scene(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(n, H, W, 3) uint8 frames with what real video has for a scaler to get wrong: smooth colour gradients, hard
    coloured edges moving each frame, fine texture; an asymmetric marker (top-left block) shows orientation."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = rng.integers(-12, 12, (height, width, 3))
    frames = []
    for t in range(n):
        img = np.stack([60 + 150 * x / max(width - 1, 1), 40 + 120 * y / max(height - 1, 1),
                        128 + 100 * np.sin((x + 3 * t) / 5.0)], -1) + texture
        left = (t * 3) % max(width - width // 4, 1)
        img[height // 3: 2 * height // 3, left:left + width // 4] = (230, 30, 40)
        img[: max(height // 5, 1), : max(width // 5, 1)] = (20, 220, 60)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


FEATURES = ("bframes", "sar", "odd_size", "rotate90", "rotate180", "rotate270", "vfr", "yuvj_full_range")


def write_feature_video(path, feature: str, n: int = 30) -> Path:
    """An H.264 mp4 with one real-world feature (B-frames are on in every one: libx264's default)."""
    path = Path(path)
    height, width, pix_fmt = 72, 96, "yuv420p"
    if feature == "odd_size":
        height, width, pix_fmt = 67, 101, "yuv444p"  # 4:2:0 needs even sizes in libx264
    if feature == "yuvj_full_range":
        pix_fmt = "yuvj420p"
    frames = scene(n, height, width)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.gop_size = 12
        stream.codec_context.max_b_frames = 3
        if feature == "sar":
            stream.codec_context.sample_aspect_ratio = Fraction(16, 11)
        if feature.startswith("rotate"):
            stream.set_display_rotation(-int(feature[len("rotate"):]))  # counter-clockwise degrees
        if feature == "vfr":
            stream.codec_context.time_base = Fraction(1, 1000)
        stamp = 0
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if feature == "vfr":  # 40 ms, then runs of 20 ms and 100 ms frames
                frame.pts, frame.time_base = stamp, Fraction(1, 1000)
                stamp += (40, 20, 20, 100)[i % 4]
            else:
                frame.pts, frame.time_base = i, Fraction(1, 25)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
