"""Media made on the spot for tests and the CPU demo: an mp4 with a moving square and an optional tone."""
from __future__ import annotations

import fractions
from pathlib import Path

import av
import numpy as np

from vllama_jax.data.prepare import prepare, shard_paths
from vllama_jax.data.tokenizer import build_bpe_tokenizer, load_tokenizer


def write_test_video(
    path: str | Path,
    *,
    num_frames: int = 24,
    size: tuple[int, int] = (64, 48),
    fps: int = 8,
    color: tuple[int, int, int] = (220, 40, 40),
    tone_hz: float | None = 440.0,
    sample_rate: int = 16000,
    gop_size: int | None = None,
) -> Path:
    """Write an H.264 mp4 (width, height = size) of a square moving left to right; with an AAC sine track
    at `tone_hz` unless it is None; `gop_size` frames between keyframes (default: the encoder's). Returns the path."""
    path = Path(path)
    width, height = size
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if gop_size:
            video.codec_context.gop_size = gop_size
        audio = None
        if tone_hz is not None:
            audio = container.add_stream("aac", rate=sample_rate)
            audio.layout = "mono"
        side = max(4, min(width, height) // 3)
        for i in range(num_frames):
            image = np.full((height, width, 3), 16, np.uint8)
            x = int((width - side) * i / max(1, num_frames - 1))
            image[(height - side) // 2:(height + side) // 2, x:x + side] = color
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio is not None:
            seconds = num_frames / fps
            t = np.arange(int(seconds * sample_rate)) / sample_rate
            wave = (0.3 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
            chunk = 1024
            for start in range(0, len(wave), chunk):
                frame = av.AudioFrame.from_ndarray(wave[None, start:start + chunk], format="flt", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                frame.time_base = fractions.Fraction(1, sample_rate)
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
    return path


def write_test_image(path: str | Path, *, size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (30, 200, 60)) -> Path:
    """Write a JPEG (width, height = size): the left half `color`, the right half black. Returns the path."""
    path = Path(path)
    width, height = size
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = color
    with av.open(str(path), mode="w", format="image2pipe") as container:
        stream = container.add_stream("mjpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


SYNTHETIC_COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 220), "yellow": (230, 220, 40)}


def synthetic_caption_data(workdir: Path, num_clips: int, vocab_size: int):
    """The tiny default: mp4 clips of a coloured square moving right, captioned, ingested with vllama-prepare;
    a BPE tokenizer trained on the captions. Reused when already in `workdir`."""
    data, media = workdir / "data", workdir / "data" / "media"
    if not (data / "manifest.json").exists():
        media.mkdir(parents=True, exist_ok=True)
        rows = ["videoid,name,page_dir"]
        for i in range(num_clips):
            color = list(SYNTHETIC_COLORS)[i % len(SYNTHETIC_COLORS)]
            write_test_video(media / f"clip{i}.mp4", num_frames=16 + i % 5, color=SYNTHETIC_COLORS[color], tone_hz=None)
            rows.append(f"clip{i},A {color} square moves from left to right.,.")
        (data / "annotations.csv").write_text("\n".join(rows) + "\n")
        prepare("webvid", data / "annotations.csv", media, data, name="synthetic", records_per_shard=8, log=lambda *_: None)
    if not (workdir / "tokenizer").exists():
        captions = [line.split(",")[1] for line in (data / "annotations.csv").read_text().splitlines()[1:]]
        build_bpe_tokenizer([c.lower() for c in captions] * 4, vocab_size=vocab_size).save_pretrained(workdir / "tokenizer")
    return shard_paths(data), load_tokenizer(workdir / "tokenizer")
