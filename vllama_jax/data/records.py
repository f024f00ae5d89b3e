"""One training sample as an ArrayRecord record: the original encoded media bytes plus text and metadata.

A record is a msgpack map. Media are stored exactly as read from disk (no re-encoding); text fields are stored
as the source's raw UTF-8 bytes, so a caption that is not valid UTF-8 survives ingest and is counted (not
crashed on) by the pipeline.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any

import av
import msgpack

from vllama_jax.data import video_decode


@dataclasses.dataclass
class Sample:
    id: str
    dataset: str
    kind: str  # "video", "image", or "text" (no media: Video-LLaVA's text-only conversations)
    media: bytes
    media_name: str  # the path the bytes came from, relative to the media root
    caption: bytes | None = None
    conversation: list[dict[str, bytes]] | None = None  # [{"from": b"human"|b"gpt", "value": b"..."}]
    duration: float = 0.0
    fps: float = 0.0
    num_frames: int = 0
    has_audio: bool = False
    width: int = 0
    height: int = 0


def encode(sample: Sample) -> bytes:
    return msgpack.packb(dataclasses.asdict(sample), use_bin_type=True)


def decode(record: bytes) -> Sample:
    fields = msgpack.unpackb(record, raw=False, strict_map_key=False, unicode_errors="surrogateescape")
    return Sample(**fields)


def probe_media(data: bytes, kind: str) -> dict[str, Any]:
    """Duration, fps, frame count, audio presence and size of encoded media; ValueError when it cannot be read.

    The first frame is decoded, so a file whose header parses but whose video does not is rejected at ingest. A
    video's frame count is decord's, the stream's packets (`video_decode.frame_table`), which the pipeline samples
    frame indices from: not the header's count, nor duration × fps (which overcounts where the header is silent).
    """
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise ValueError("no decodable frame")
            meta = {
                "duration": float(container.duration / av.time_base) if container.duration else 0.0,
                "fps": float(stream.average_rate or 0.0),
                "has_audio": bool(container.streams.audio),
                "width": first.width,
                "height": first.height,
            }
    except av.error.FFmpegError as err:
        raise ValueError(f"cannot decode: {err}") from err
    frames = video_decode.count_frames(data, "probe") if kind == "video" else 1
    return {**meta, "num_frames": max(frames, 1)}
