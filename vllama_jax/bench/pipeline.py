"""Decode + preprocess throughput of the pipeline's video path against decoding every frame.

    python -m vllama_jax.bench.pipeline [--clips=4] [--seconds=12] [--repeats=3] [--out=FILE]

Both arms run in this one process, one clip at a time, on the same generated clips (25 fps, 320x240, a 2-s
keyframe interval as web video has, an AAC tone track) and include the same audio call
(`audio.load_audio_clips`: 8 ImageBind fbank clips):
- baseline: decode every frame with PyAV, convert each to a 224x224 RGB array, keep 8 uniform frames, normalise;
- ours: the pipeline's eval read, `video.read_sampled` of the 8 uniform frames at 224 (decord's count, indices and
  scaler; one demuxing pass), then `eval_transform`.
Both use PyAV's default decoder threading (slice threads; libx264 output has one slice per frame, so decoding
runs on one core). The video and the audio part of each arm are timed separately, in wall time and in process
CPU time (the CPU figures are the steadier ones on a shared machine). Reports clips/s (= clips/s/core: one
process, one clip at a time) for each arm and their ratio, as a Markdown table and a JSON line (also to --out).
"""
from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from vllama_jax.data import audio, video
from vllama_jax.data.synthetic import write_test_video

NUM_FRAMES, IMAGE_SIZE, FPS = 8, 224, 25


def baseline_video(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        every = [f.to_ndarray(width=IMAGE_SIZE, height=IMAGE_SIZE, format="rgb24") for f in container.decode(video=0)]
    picked = [every[i] for i in video.frame_indices(len(every), NUM_FRAMES)]
    return video.normalize(np.stack(picked))


def ours_video(path: Path) -> np.ndarray:
    frames, _, _ = video.read_sampled(path, lambda count: video.frame_indices(count, NUM_FRAMES), IMAGE_SIZE)
    return video.eval_transform(frames, IMAGE_SIZE)


def both_audio(path: Path):
    return audio.load_audio_clips(path)


ARMS = {"baseline": baseline_video, "ours": ours_video}


def time_arm(video_fn, clips) -> dict[str, float]:
    """Seconds for one pass over the clips, video and audio parts apart, wall and CPU."""
    out = dict.fromkeys(("video_wall", "video_cpu", "audio_wall", "audio_cpu"), 0.0)
    for clip in clips:
        wall, cpu = time.perf_counter(), time.process_time()
        video_fn(clip)
        wall2, cpu2 = time.perf_counter(), time.process_time()
        both_audio(clip)
        out["video_wall"] += wall2 - wall
        out["video_cpu"] += cpu2 - cpu
        out["audio_wall"] += time.perf_counter() - wall2
        out["audio_cpu"] += time.process_time() - cpu2
    return out


def _threading(path: Path) -> str:
    with av.open(str(path)) as container:
        context = container.streams.video[0].codec_context
        return f"{context.thread_type.name}, thread_count={context.thread_count} (0 = auto)"


def run(num_clips: int, seconds: float, repeats: int, workdir: Path) -> dict:
    clips = [
        write_test_video(workdir / f"clip{i}.mp4", num_frames=int(seconds * FPS), size=(320, 240), fps=FPS,
                         gop_size=2 * FPS, tone_hz=300.0 + 100 * i)
        for i in range(num_clips)
    ]
    for fn in ARMS.values():  # warm-up: imports, codec set-up
        fn(clips[0])
    both_audio(clips[0])
    runs = {name: [] for name in ARMS}
    for _ in range(repeats):  # interleaved, so machine noise hits both arms alike
        for name, fn in ARMS.items():
            runs[name].append(time_arm(fn, clips))
    # per arm and part: the median over repeats, per clip
    per_clip = {name: {part: statistics.median(r[part] for r in runs[name]) / num_clips for part in runs[name][0]}
                for name in ARMS}
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "pyav": av.__version__,
        "decoder_threading": _threading(clips[0]),
        "clips": num_clips,
        "clip_seconds": seconds,
        "repeats": repeats,
    }
    for clock in ("wall", "cpu"):
        total = {name: per_clip[name][f"video_{clock}"] + per_clip[name][f"audio_{clock}"] for name in ARMS}
        for name in ARMS:
            result[f"{name}_clips_per_s_{clock}"] = round(1 / total[name], 3)
            result[f"{name}_video_s_per_clip_{clock}"] = round(per_clip[name][f"video_{clock}"], 4)
            result[f"{name}_audio_s_per_clip_{clock}"] = round(per_clip[name][f"audio_{clock}"], 4)
        result[f"ratio_{clock}"] = round(total["baseline"] / total["ours"], 2)
        result[f"video_only_ratio_{clock}"] = round(
            per_clip["baseline"][f"video_{clock}"] / per_clip["ours"][f"video_{clock}"], 2
        )
    # the headline figures: wall clock, one process, one clip at a time, so clips/s/core = clips/s / 1
    result["baseline_clips_per_s"] = result["baseline_clips_per_s_wall"]
    result["ours_clips_per_s"] = result["ours_clips_per_s_wall"]
    result["ratio"] = result["ratio_wall"]
    return result


def report(result: dict) -> str:
    """The Markdown table and the JSON line."""
    rows = []
    for name, label in (
        ("baseline", "baseline: decode every frame, convert each"),
        ("ours", "ours: seek to the 8 frames"),
    ):
        cells = [label]
        for clock in ("wall", "cpu"):
            rate = result[f"{name}_clips_per_s_{clock}"]
            cells += [
                f"{rate}",
                f"{rate / 1:.3f}",
                f"{result[f'{name}_video_s_per_clip_{clock}']}",
                f"{result[f'{name}_audio_s_per_clip_{clock}']}",
            ]
        rows.append("| " + " | ".join(cells) + " |")
    lines = [
        f"{result['clips']} clips of {result['clip_seconds']:g} s, 320x240 at {FPS} fps, 2-s GOP, AAC tone; "
        f"{NUM_FRAMES} frames at {IMAGE_SIZE} px + audio fbank clips; decoder threading {result['decoder_threading']}; "
        f"median of {result['repeats']} repeats",
        "",
        "| arm | clips/s (wall) | clips/s/core (wall) | video s/clip (wall) | audio s/clip (wall) "
        "| clips/s (CPU) | clips/s/core (CPU) | video s/clip (CPU) | audio s/clip (CPU) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "| **ratio ours/baseline** | **{ratio_wall}x** | | video only {video_only_ratio_wall}x | "
        "| **{ratio_cpu}x** | | video only {video_only_ratio_cpu}x | |".format(**result),
        "",
        json.dumps(result),
    ]
    return "\n".join(lines)


def main(argv) -> dict:
    from absl import flags

    del argv
    f = flags.FLAGS
    with tempfile.TemporaryDirectory() as tmp:
        result = run(f.clips, f.seconds, f.repeats, Path(tmp))
    text = report(result)
    print(text)
    if f.out:
        Path(f.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_integer("clips", 4, "clips per arm")
    flags.DEFINE_float("seconds", 12.0, "length of each clip")
    flags.DEFINE_integer("repeats", 3, "timed passes (the median is reported)")
    flags.DEFINE_string("out", None, "also write the table and the JSON line to this file")
    app.run(main)
