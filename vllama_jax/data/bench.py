"""Decode + preprocess throughput of the pipeline's video path against decoding every frame.

    python -m vllama_jax.data.bench [--clips 4] [--seconds 12] [--repeats 3]

Both arms run in this one process, one clip at a time, on the same generated clips (25 fps, 320x240, a 2-s
keyframe interval as web video has, an AAC tone track) and include the same audio work (8 ImageBind fbank clips):
- baseline: decode every frame with PyAV, convert each to a 224x224 RGB array, keep 8 uniform frames, normalise;
- ours: `read_frames_seeking` of the 8 uniform frames at 224, then `eval_transform`.
Reports clips/s (= clips/s/core: one process, one clip at a time) for each arm and their ratio.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import av

from vllama_jax.data import audio, video
from vllama_jax.data.synthetic import write_test_video

NUM_FRAMES, IMAGE_SIZE = 8, 224


def baseline(path: Path):
    with av.open(str(path)) as container:
        every = [f.to_ndarray(width=IMAGE_SIZE, height=IMAGE_SIZE, format="rgb24") for f in container.decode(video=0)]
    picked = [every[i] for i in video.frame_indices(len(every), NUM_FRAMES)]
    frames = video.normalize(__import__("numpy").stack(picked))
    return frames, audio.load_audio_clips(path)


def ours(path: Path):
    indices = video.frame_indices(video.count_frames(path), NUM_FRAMES)
    frames, _ = video.read_frames_seeking(path, indices, IMAGE_SIZE)
    return video.eval_transform(frames, IMAGE_SIZE), audio.load_audio_clips(path)


def audio_only(path: Path):
    return audio.load_audio_clips(path)


def time_arm(fn, clips) -> float:
    start = time.perf_counter()
    for clip in clips:
        fn(clip)
    return time.perf_counter() - start


def run(num_clips: int, seconds: float, repeats: int, workdir: Path) -> dict:
    fps = 25
    clips = [
        write_test_video(workdir / f"clip{i}.mp4", num_frames=int(seconds * fps), size=(320, 240), fps=fps,
                         gop_size=2 * fps, tone_hz=300.0 + 100 * i)
        for i in range(num_clips)
    ]
    arms = {"baseline": baseline, "ours": ours, "audio_only": audio_only}
    for fn in arms.values():  # warm-up: imports, codec set-up
        fn(clips[0])
    times = {name: [] for name in arms}
    for _ in range(repeats):  # interleaved, so machine noise hits both arms alike
        for name, fn in arms.items():
            times[name].append(time_arm(fn, clips))
    rate = {name: num_clips / statistics.median(t) for name, t in times.items()}
    video_seconds = {name: statistics.median(times[name]) / num_clips - statistics.median(times["audio_only"]) / num_clips
                     for name in ("baseline", "ours")}
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "pyav": av.__version__,
        "clips": num_clips,
        "clip_seconds": seconds,
        "baseline_clips_per_s": round(rate["baseline"], 3),
        "ours_clips_per_s": round(rate["ours"], 3),
        "ratio": round(rate["ours"] / rate["baseline"], 2),
        "audio_s_per_clip": round(statistics.median(times["audio_only"]) / num_clips, 4),
        "video_s_per_clip_baseline": round(video_seconds["baseline"], 4),
        "video_s_per_clip_ours": round(video_seconds["ours"], 4),
        "video_only_ratio": round(video_seconds["baseline"] / video_seconds["ours"], 2),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.clips, args.seconds, args.repeats, Path(tmp))
    print("| arm | clips/s/core | video s/clip |")
    print("|---|---|---|")
    print(f"| decode every frame (baseline) | {result['baseline_clips_per_s']} | {result['video_s_per_clip_baseline']} |")
    print(f"| seek to 8 frames (ours) | {result['ours_clips_per_s']} | {result['video_s_per_clip_ours']} |")
    print(f"ratio {result['ratio']}x with audio ({result['audio_s_per_clip']} s/clip of audio in both arms), "
          f"{result['video_only_ratio']}x for the video part alone")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
