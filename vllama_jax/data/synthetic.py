"""Media made on the spot for tests and the CPU demo: test clips, and the tiny default's world of coloured
shapes in motion with captions naming colour, shape and motion."""
from __future__ import annotations

import fractions
from pathlib import Path

import av
import numpy as np

from vllama_jax.data.prepare import prepare, shard_paths
from vllama_jax.data.tokenizer import build_bpe_tokenizer


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
            _write_audio(container, audio, tone(tone_hz, num_frames / fps, sample_rate), sample_rate)
    return path


def tone(hz: float, seconds: float, sample_rate: int = 16000, beeps_per_second: float = 0.0) -> np.ndarray:
    """A sine at `hz`; with beeps_per_second > 0, switched on and off that many times a second (half duty)."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = 0.3 * np.sin(2 * np.pi * hz * t)
    if beeps_per_second:
        wave *= (t * beeps_per_second) % 1.0 < 0.5
    return wave.astype(np.float32)


def _write_audio(container, stream, wave: np.ndarray, sample_rate: int) -> None:
    chunk = 1024
    for start in range(0, len(wave), chunk):
        frame = av.AudioFrame.from_ndarray(wave[None, start:start + chunk], format="flt", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = start
        frame.time_base = fractions.Fraction(1, sample_rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_test_image(
    path: str | Path, *, size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (30, 200, 60)
) -> Path:
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
SHAPES = ("square", "circle", "triangle")
# motion phrase -> (start, end) centre in units of the free travel range, (x, y) with y downwards
MOTIONS = {
    "from left to right": ((0.0, 0.5), (1.0, 0.5)),
    "from right to left": ((1.0, 0.5), (0.0, 0.5)),
    "from top to bottom": ((0.5, 0.0), (0.5, 1.0)),
    "from bottom to top": ((0.5, 1.0), (0.5, 0.0)),
}
ATTRIBUTES = {"color": tuple(SYNTHETIC_COLORS), "shape": SHAPES, "motion": tuple(MOTIONS)}
# the sounds world (the audio-visual variant): each clip carries a tone whose pitch and rhythm the caption names
PITCHES = {"low": 300.0, "high": 1800.0}  # Hz
RHYTHMS = {"steady": 0.0, "beeping": 4.0}  # on/off switches per second
SOUND_ATTRIBUTES = {"pitch": tuple(PITCHES), "rhythm": tuple(RHYTHMS)}
# one word per motion, for the text contexts the tiny LLM is pretrained with (vllama_jax/train/pretrain_llm.py)
MOTION_WORDS = {
    "from left to right": "rightwards",
    "from right to left": "leftwards",
    "from top to bottom": "downwards",
    "from bottom to top": "upwards",
}


def attribute_context(caption: str) -> str:
    """The caption's attributes as a short text: "red circle rightwards " (+ "high beeping " with a sound)."""
    found = parse_caption(caption)
    sound = f"{found['pitch']} {found['rhythm']} " if found["pitch"] else ""
    return f"{found['color']} {found['shape']} {MOTION_WORDS[found['motion']]} " + sound


def shape_mask(shape: str, side: int) -> np.ndarray:
    """A side x side boolean stencil: a filled square, disc or upward triangle."""
    y, x = np.mgrid[:side, :side] + 0.5
    if shape == "square":
        return np.ones((side, side), bool)
    if shape == "circle":
        return (x - side / 2) ** 2 + (y - side / 2) ** 2 <= (side / 2) ** 2
    if shape == "triangle":
        return np.abs(x - side / 2) <= y / 2
    raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")


def write_shape_video(
    path: str | Path,
    color: str,
    shape: str,
    motion: str,
    rng: np.random.Generator,
    *,
    size: int = 64,
    num_frames: int = 16,
    fps: int = 8,
    sound: tuple[str, str] | None = None,
    sample_rate: int = 16000,
) -> Path:
    """An H.264 mp4 (size x size) of one coloured shape crossing the frame; size, offset across the path and
    background brightness vary with `rng`, so clips of the same caption differ. `sound` = (pitch, rhythm) adds
    an AAC track of that tone (its frequency jittered by ±5 % and its phase by `rng`)."""
    path = Path(path)
    side = int(rng.integers(size * 7 // 16, size // 2 + 1))  # narrow: the shapes differ in area, not only outline
    travel = size - side
    across = float(rng.uniform(0.25, 0.75))  # where on the perpendicular axis the path runs
    (x0, y0), (x1, y1) = MOTIONS[motion]
    x0, x1 = (across, across) if x0 == x1 else (x0, x1)
    y0, y1 = (across, across) if y0 == y1 else (y0, y1)
    background = int(rng.integers(0, 40))
    stencil = shape_mask(shape, side)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        audio = None
        if sound is not None:
            audio = container.add_stream("aac", rate=sample_rate)
            audio.layout = "mono"
        for i in range(num_frames):
            t = i / (num_frames - 1)
            left, top = round(travel * (x0 + (x1 - x0) * t)), round(travel * (y0 + (y1 - y0) * t))
            image = np.full((size, size, 3), background, np.uint8)
            image[top : top + side, left : left + side][stencil] = SYNTHETIC_COLORS[color]
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            pitch, rhythm = sound
            hz = PITCHES[pitch] * float(rng.uniform(0.95, 1.05))
            wave = tone(hz, num_frames / fps + 0.25, sample_rate, RHYTHMS[rhythm])
            wave = np.roll(wave, int(rng.integers(0, sample_rate // 4)))
            _write_audio(container, audio, wave, sample_rate)
    return path


def shape_caption(color: str, shape: str, motion: str, sound: tuple[str, str] | None = None) -> str:
    caption = f"A {color} {shape} moves {motion}"
    return caption + (f" with a {sound[0]} {sound[1]} tone." if sound else ".")


def parse_caption(text: str) -> dict[str, str | None]:
    """The first colour, shape and motion named in `text` (None where it names none)."""
    text = text.lower()
    out = {}
    for name, values in {**ATTRIBUTES, **SOUND_ATTRIBUTES}.items():
        found = [(text.find(v), v) for v in values if v in text]
        out[name] = min(found)[1] if found else None
    return out


def shapes_world(
    workdir: Path, num_train: int, num_eval: int, vocab_size: int, seed: int = 0, sounds: bool = False
) -> dict:
    """The tiny default's data: `num_train` and `num_eval` (held-out) captioned clips of coloured shapes in
    motion, ingested with vllama-prepare into workdir/data/{train,eval}, and a BPE tokenizer trained on the
    caption text in workdir/tokenizer. Every combination of colour, shape and motion (and with `sounds`, pitch
    and rhythm of the clip's tone) is cycled through; each clip draws its own size, path and background.
    Reused when already there. Returns the paths.

    The tokenizer also learns the attribute contexts (`attribute_context`), part of the tiny LLM's text."""
    visual = [(c, s, m) for c in SYNTHETIC_COLORS for s in SHAPES for m in MOTIONS]
    sound_combos = [(p, r) for p in PITCHES for r in RHYTHMS] if sounds else [None]
    combos = [(*v, sound) for v in visual for sound in sound_combos]
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("eval", num_eval)):
        out, media = workdir / "data" / split, workdir / "data" / split / "media"
        if (out / "manifest.json").exists():
            continue
        media.mkdir(parents=True, exist_ok=True)
        rows = ["videoid,name,page_dir"]
        # held out: every visual combination once, in order (with sounds, a shuffled cycle of all of them)
        order = rng.permutation(len(combos)) if split == "train" or sounds else np.arange(len(combos))
        for i in range(count):
            color, shape, motion, sound = combos[order[i % len(combos)]]
            write_shape_video(media / f"{split}{i}.mp4", color, shape, motion, rng, sound=sound)
            rows.append(f"{split}{i},{shape_caption(color, shape, motion, sound)},.")
        (out / "annotations.csv").write_text("\n".join(rows) + "\n")
        prepare(
            "webvid",
            out / "annotations.csv",
            media,
            out,
            name=f"shapes_{split}",
            records_per_shard=64,
            log=lambda *_: None,
        )
    tokenizer = workdir / "tokenizer"
    if not tokenizer.exists():
        captions = [shape_caption(*combo).lower() for combo in combos]
        corpus = (captions + [attribute_context(c) for c in captions]) * 4
        build_bpe_tokenizer(corpus, vocab_size=vocab_size).save_pretrained(tokenizer)
    return {
        "train": shard_paths(workdir / "data" / "train"),
        "eval": shard_paths(workdir / "data" / "eval"),
        "tokenizer": tokenizer,
    }
