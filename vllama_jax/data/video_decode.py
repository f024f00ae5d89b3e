"""Video frames by index, as decord 0.6.0 (the original's reader) gives them, decoded with PyAV.

Three things make decord's frames what they are, and each is reproduced here:
- **Which frame is frame i**: decord demuxes every packet of the stream, sorts their presentation time stamps,
  and frame i is the one with the i-th smallest; the frame count (`len(vr)`) is the packet count. For variable
  frame rate this is not presentation time × average fps (`FrameTable`).
- **How it is resized**: decord asks for W × H frames, so its FFmpeg filter graph does it: `scale=W:H` with the
  scale filter's default flags of FFmpeg 4.1 (bilinear), converting to rgb24 in the same step. The same filter
  graph runs here through PyAV (`_Scaler`); FFmpeg 8's scale filter defaults to bicubic, so `flags=bilinear` is
  spelled out. On the original repository's example clips this gives decord's bytes exactly.
- **Rotation**: a stream whose display matrix turns it by 90, 180 or 270 degrees is transposed before scaling.

`read_frames_seeking` seeks to the keyframe before each wanted frame instead of decoding the whole stream
(`_SeekingDecoder`); `read_frames` decodes in stream order, the simple reference both must agree with.
"""
from __future__ import annotations

import bisect
import dataclasses
import io
from pathlib import Path

import av
import numpy as np

# libavfilter's scale filter of FFmpeg 4.1 (decord 0.6.0's) uses these libswscale flags when none are given
DECORD_SCALE_FLAGS = "bilinear"
# decord's filter chain before scaling, by clockwise display rotation in degrees
_TRANSPOSES = {90: ("1",), 180: ("1", "1"), 270: ("2",)}


def _source_label(source, name: str | None) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes> {name}" if name else "<bytes>"
    return f"{source} ({name})" if name and name != str(source) else str(source)


def _open(source):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(source))
    return av.open(str(source))


@dataclasses.dataclass(frozen=True)
class FrameTable:
    """decord's frame index of one video stream: the packets' presentation time stamps in ascending order (frame
    i is pts[i]), the indices of the keyframes among them, and the average frame rate. `pts` is None when the
    stream's packets carry no time stamps; frames are then counted in decoding output order."""

    count: int
    pts: tuple[int, ...] | None
    keyframes: tuple[int, ...]
    fps: float

    def index_of(self, pts: int | None, previous: int | None) -> int:
        """The index of a decoded frame from its time stamp (the next one after `previous` without one)."""
        if pts is None or self.pts is None:
            return 0 if previous is None else previous + 1
        i = bisect.bisect_left(self.pts, pts)
        if i < self.count and self.pts[i] == pts:
            return i
        return i - 0.5  # between two indexed frames (not one decord would return): never equal to a target

    def keyframe_between(self, low: int, high: int) -> bool:
        """Whether a keyframe sits at an index in (low, high]."""
        i = bisect.bisect_right(self.keyframes, low)
        return i < len(self.keyframes) and self.keyframes[i] <= high


def frame_table(container, label: str) -> FrameTable:
    """Demux every packet of the first video stream (no decoding) into its `FrameTable`, as decord indexes a
    file when it opens it. Leaves the container at its end: seek or reopen before decoding."""
    if not container.streams.video:
        raise ValueError(f"{label}: no video stream")
    stream = container.streams.video[0]
    stamps, keys = [], []
    try:
        for packet in container.demux(stream):
            if packet.size == 0 and packet.pts is None and packet.dts is None:
                continue  # PyAV's end-of-stream flush packet, not one of the file's
            stamps.append(packet.pts if packet.pts is not None else packet.dts)
            keys.append(bool(packet.is_keyframe))
    except av.error.FFmpegError as err:
        raise ValueError(f"{label}: cannot read the video's packets ({err})") from err
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    if not stamps or any(s is None for s in stamps):
        return FrameTable(len(stamps), None, (), fps)  # decoded from the start only, counted in output order
    order = sorted(range(len(stamps)), key=lambda i: stamps[i])
    pts = tuple(stamps[i] for i in order)
    keyframes = tuple(sorted(rank for rank, i in enumerate(order) if keys[i]))
    return FrameTable(len(pts), pts, keyframes, fps)


def count_frames(source, name: str | None = None) -> int:
    """The frame count decord reports (`len(VideoReader(...))`): the video stream's packets, counted by demuxing.
    `source` is a path or the encoded bytes."""
    label = _source_label(source, name)
    try:
        container = _open(source)
    except av.error.FFmpegError as err:
        raise ValueError(f"{label}: cannot open video ({err})") from err
    with container:
        return frame_table(container, label).count


def clockwise_rotation(frame) -> int:
    """The frame's display rotation as decord reads the stream's: clockwise degrees, 0 unless 90, 180 or 270."""
    degrees = int(-round(frame.rotation or 0)) % 360
    return degrees if degrees in _TRANSPOSES else 0


class _Scaler:
    """decord's filter graph, through PyAV: [transpose …] → scale=W:H (bilinear) → rgb24. Built from the first
    frame it sees (the stream's format, aspect ratio, colour properties and rotation) and rebuilt if a frame of
    another size or format comes; `size` None keeps the (rotated) native size, as decord's width = height = -1."""

    def __init__(self, size: int | tuple[int, int] | None):
        self.size = (size, size) if isinstance(size, int) else size
        self.graph = self.key = None

    def _build(self, frame, template):
        rotation = clockwise_rotation(frame)
        width, height = frame.width, frame.height
        if rotation in (90, 270):
            width, height = height, width
        out_w, out_h = (width, height) if self.size is None else (self.size[1], self.size[0])
        graph = av.filter.Graph()
        nodes = [graph.add_buffer(template=template)]
        for direction in _TRANSPOSES.get(rotation, ()):
            nodes.append(graph.add("transpose", direction))
        nodes.append(graph.add("scale", f"{out_w}:{out_h}:flags={DECORD_SCALE_FLAGS}"))
        nodes.append(graph.add("format", "rgb24"))
        nodes.append(graph.add("buffersink"))
        for a, b in zip(nodes, nodes[1:]):
            a.link_to(b)
        graph.configure()
        self.graph = graph

    def __call__(self, frame, template) -> np.ndarray:
        key = (frame.width, frame.height, frame.format.name)
        if self.graph is None or key != self.key:
            self._build(frame, template)
            self.key = key
        self.graph.push(frame)
        return self.graph.pull().to_ndarray()


def read_frames(path: str | Path, indices, image_size: int | None) -> tuple[np.ndarray, float]:
    """The frames at `indices` as uint8 (len(indices), S, S, 3) (native size when image_size is None), and the
    average fps. The simple reference: every frame up to the last wanted one is decoded in output (presentation)
    order, which is decord's order; those not asked for skip the scaler."""
    label = str(path)
    wanted: dict[int, list[int]] = {}
    for k, i in enumerate(indices):  # an index may repeat (short videos are padded by repeating a frame)
        wanted.setdefault(int(i), []).append(k)
    found: dict[int, np.ndarray] = {}
    scaler = _Scaler(image_size)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{label}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    found[i] = scaler(frame, stream)
                if len(found) == len(wanted):
                    break
    except (av.error.FFmpegError, IndexError) as err:
        raise ValueError(f"{label}: cannot decode video ({err})") from err
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ValueError(f"{label}: frames {missing[:5]} are past the end of the video")
    return np.stack([found[int(i)] for i in indices]), fps


class _SeekingDecoder:
    """Frames of one video stream by decord index, seeking only when that saves decoding.

    To reach frame t it either keeps decoding forward from the current position p (when no keyframe lies in
    (p, t], i.e. t is in the GOP being decoded) or seeks to the keyframe at or before t's time stamp. After a
    seek, frames output before the first keyframe (open-GOP leading pictures, whose references were skipped) are
    not trusted; if the first trusted frame is already past t the seek landed too late (demuxers seek on decode
    time stamps), and it backs off further, doubling the step, down to decoding from the start of the stream.
    That last resort reopens the file rather than seeking to its start (MPEG-TS seeks on decode time stamps land
    late), so it decodes exactly what `read_frames` does. `reopen` gives a fresh container of the same file.
    """

    def __init__(self, container, label: str, table: FrameTable, reopen=None):
        self.container, self.stream, self.label, self.reopen = container, container.streams.video[0], label, reopen
        self.table = table
        self.frames = None  # the decode generator of the current run
        self.position: int | None = None  # index of the last frame output in the current run
        self.trusted = False  # a keyframe has been output since the last seek
        self.from_start = False  # the current run started at the beginning of the stream
        self.unseekable = table.pts is None  # no time stamps to seek to: only decode from the start on
        self.decoded_any = False
        self.decoded_frames = 0  # for tests and the benchmark
        self.seeks = 0

    def _seek(self, index: int | None):
        """Seek to the keyframe at or before frame `index`, or go back to the start of the stream when None (also
        when the container cannot seek)."""
        if index is not None and not self.unseekable:
            try:
                self.container.seek(self.table.pts[index], stream=self.stream, backward=True, any_frame=False)
            except av.error.FFmpegError:
                self.unseekable = True
        if index is None or self.unseekable:
            index = None
            if self.reopen is not None:
                self.container.close()
                self.container = self.reopen()
                self.stream = self.container.streams.video[0]
            else:
                self.container.seek(0, stream=self.stream, backward=True, any_frame=False)
        self.frames = self.container.decode(self.stream)
        self.position, self.trusted, self.from_start = None, index is None, index is None
        self.seeks += 1

    def _next(self):
        """The next trusted frame of the current run and its index, or (None, None) at the end of the stream."""
        for frame in self.frames:
            self.decoded_any = True
            self.decoded_frames += 1
            if frame.pts is None and self.position is None and not self.from_start:
                raise ValueError(f"{self.label}: a frame has no time stamp")
            index = self.table.index_of(frame.pts, self.position)
            self.trusted = self.trusted or frame.key_frame
            if self.trusted:
                self.position = index
                return frame, index
        return None, None

    def get(self, target: int):
        if (
            self.position is None
            or target <= self.position
            or (not self.unseekable and self.table.keyframe_between(int(self.position), target))
        ):
            self._seek(target)
        back = max(1, int(self.table.fps))  # first back-off: 1 s before the target
        while True:
            frame, index = self._next()
            while frame is not None and index < target:
                frame, index = self._next()
            if frame is not None and index == target:
                return frame
            if frame is None and (self.from_start or (self.decoded_any and self.position is not None)):
                if not self.decoded_any:
                    raise ValueError(f"{self.label}: the video has no frames")
                raise ValueError(
                    f"{self.label}: frame {target} is past the end of the video (last frame {self.position})"
                )
            if frame is not None and self.from_start:
                raise ValueError(f"{self.label}: frame {target} not found (the stream jumps from before it to "
                                 f"a frame at {index})")
            # landed after the target, or got nothing: seek further back, at the start at the latest
            if target - back > 0:
                self._seek(target - back)
                back *= 2
            else:
                self._seek(None)


def read_frames_seeking(source, indices, image_size: int | None, name: str | None = None) -> tuple[np.ndarray, float]:
    """Frames at decord `indices` (any order, repeats allowed) as uint8 (len, S, S, 3) with S = image_size (aspect
    ratio not kept, as the original's decord reader), or at native size when image_size is None; and the
    average fps. The pixels are decord's (see the module docstring) and equal `read_frames`' for the same indices.

    `source` is a path or the encoded file as bytes; errors are ValueErrors naming it ('<bytes>' plus `name`).
    Seeks to the keyframe before a wanted frame instead of decoding the whole stream, and decodes on when the
    next wanted frame is in the GOP being decoded (see `_SeekingDecoder`); only wanted frames are scaled.
    """
    frames, _, fps = read_sampled(source, lambda count: indices, image_size, name)
    return frames, fps


def read_sampled(source, pick, image_size: int | None, name: str | None = None) -> tuple[np.ndarray, list[int], float]:
    """`read_frames_seeking` of the indices `pick(frame count)` chooses, counting the frames on the same demuxing
    pass (decord's count, whatever a record or header says): (frames, the indices, average fps)."""
    label = _source_label(source, name)
    found: dict[int, np.ndarray] = {}
    container = decoder = None
    scaler = _Scaler(image_size)
    try:
        container = _open(source)
        table = frame_table(container, label)
        if table.count == 0:
            raise ValueError(f"{label}: the video has no frames")
        order = [int(i) for i in np.asarray(pick(table.count)).reshape(-1)]
        if not order:
            raise ValueError(f"{label}: no frame indices given")
        if min(order) < 0:
            raise ValueError(f"{label}: negative frame index {min(order)}")
        if max(order) >= table.count:
            raise ValueError(f"{label}: frame {max(order)} is past the end of the video (last frame "
                             f"{table.count - 1})")
        decoder = _SeekingDecoder(container, label, table, reopen=lambda: _open(source))
        for target in sorted(set(order)):
            found[target] = scaler(decoder.get(target), decoder.stream)
    except av.error.FFmpegError as err:
        raise ValueError(f"{label}: cannot decode video ({err})") from err
    finally:
        if decoder is not None:
            decoder.container.close()  # the one it reopened, if it did
        elif container is not None:
            container.close()
    return np.stack([found[i] for i in order]), order, table.fps
