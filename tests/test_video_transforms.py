"""Seek-based frame decoding against full decoding, the train/eval transforms against PyTorch, odd inputs."""
import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from vllama_jax.data import video
from vllama_jax.data.synthetic import write_test_video


def encode(path, frames, fps=25, codec="libx264", pix_fmt="yuv420p", gop=None, audio_only=False):
    """Write rgb24 frames (T, H, W, 3) with PyAV; gop sets the keyframe interval."""
    with av.open(str(path), "w") as container:
        if audio_only:
            stream = container.add_stream("aac", rate=16000)
            stream.layout = "mono"
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 16000, 0, Fraction(1, 16000)
            packets = list(stream.encode(frame)) + list(stream.encode())
        else:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
            if gop:
                stream.codec_context.gop_size = gop
            packets = [p for f in frames for p in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24"))]
            packets += list(stream.encode())
        for packet in packets:
            container.mux(packet)
    return path


def moving_frames(n, h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, h, w, 3), np.uint8)
    for t in range(n):
        frames[t] = rng.integers(0, 40, (1, 1, 3))
        frames[t, :, (t * 3) % w: (t * 3) % w + 6] = (250, 120, 20)
    return frames


@pytest.mark.parametrize("gop", [12, 50, None], ids=["gop12", "gop50", "x264-default"])
def test_seeking_gives_the_same_pixels_as_full_decoding(tmp_path, gop):
    path = encode(tmp_path / "clip.mp4", moving_frames(150), gop=gop)  # libx264 uses B-frames by default
    indices = [0, 149, 13, 13, 74, 75, 100, 3, 140, 141]
    full, fps_full = video.read_frames(path, indices, 32)
    seek, fps_seek = video.read_frames_seeking(path, indices, 32)
    from_bytes, _ = video.read_frames_seeking(path.read_bytes(), indices, 32)
    assert fps_full == fps_seek == 25.0
    np.testing.assert_array_equal(seek, full)
    np.testing.assert_array_equal(from_bytes, full)
    native, _ = video.read_frames_seeking(path, [5], None)
    assert native.shape == (1, 48, 64, 3)


def test_errors_name_the_source(tmp_path):
    good = write_test_video(tmp_path / "good.mp4", num_frames=16)
    data = good.read_bytes()
    cases = {
        "not a video": (b"\x00" * 300, "cannot decode"),
        "truncated": (data[: len(data) // 3], "cannot decode|past the end|not found"),
        "audio only": (encode(tmp_path / "a.m4a", None, audio_only=True).read_bytes(), "no video stream"),
    }
    for label, (payload, problem) in cases.items():
        with pytest.raises(ValueError, match=f"clip-{label.replace(' ', '-')}.*({problem})"):
            video.read_frames_seeking(payload, [0, 15], 28, name=f"clip-{label.replace(' ', '-')}")
    with pytest.raises(ValueError, match="good.mp4: frame 16 is past the end"):
        video.read_frames_seeking(good, [16], 28)


def test_grayscale_and_odd_sizes(tmp_path):
    gray = np.repeat(moving_frames(6, 33, 17)[..., :1], 3, axis=-1)
    path = encode(tmp_path / "gray.mp4", gray[:, :32, :16], pix_fmt="gray")  # x264 4:0:0 needs even sizes
    frames, _ = video.read_frames_seeking(path, [0, 5], 28)
    assert frames.shape == (2, 28, 28, 3)
    assert (frames[..., 0] == frames[..., 1]).all() and (frames[..., 1] == frames[..., 2]).all()
    odd = encode(tmp_path / "odd.mp4", moving_frames(5, 17, 33), pix_fmt="yuv444p")  # odd width and height
    assert video.read_frames_seeking(odd, [4], 28)[0].shape == (1, 28, 28, 3)
    tiny = encode(tmp_path / "tiny.mp4", moving_frames(3, 1, 1), pix_fmt="yuv444p")  # a 1x1 video
    assert video.read_frames_seeking(tiny, [2], 28)[0].shape == (1, 28, 28, 3)
    big = encode(tmp_path / "4k.mp4", np.full((2, 2160, 3840, 3), 90, np.uint8))
    frames, _ = video.read_frames_seeking(big, [1], 28)
    assert frames.shape == (1, 28, 28, 3) and abs(int(frames.mean()) - 90) <= 3


@pytest.mark.parametrize("shape", [(37, 23, 28, 28), (20, 30, 224, 224), (224, 224, 28, 28)])
def test_bicubic_matches_torch(shape):
    h, w, out_h, out_w = shape
    x = np.random.default_rng(0).uniform(0, 255, (2, h, w, 3))
    ours = video.resize_bicubic(x, out_h, out_w)
    theirs = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(out_h, out_w), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - theirs).max() <= 1e-4


def test_random_resized_crop_params_stay_in_bounds():
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, h, w = video.random_resized_crop_params(224, 224, rng)
        assert 0 <= top and top + h <= 224 and 0 <= left and left + w <= 224
        assert 0.5 * 224 * 224 * 0.97 <= h * w <= 224 * 224
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # a very wide frame falls back to the central crop at the largest allowed ratio
    assert video.random_resized_crop_params(10, 400, np.random.default_rng(0), scale=(0.99, 1.0)) == (0, 193, 10, 13)


def test_train_and_eval_transforms():
    frames = np.random.default_rng(1).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    out = video.train_transform(frames, np.random.default_rng(0), 224)
    assert out.shape == (8, 224, 224, 3) and out.dtype == np.float32
    # one crop box for the whole clip: a clip of identical frames stays identical
    same = video.train_transform(np.repeat(frames[:1], 3, axis=0), np.random.default_rng(0), 224)
    assert (same[0] == same[1]).all() and (same[1] == same[2]).all()
    np.testing.assert_array_equal(video.eval_transform(frames, 224), video.normalize(frames))
    assert video.eval_transform(frames[:, :100, :60], 224).shape == (8, 224, 224, 3)


def test_short_videos_are_padded_by_repeating():
    indices, real = video.sample_indices_padded(5, 8, "uniform")
    assert real == 5 and list(indices) == [0, 1, 2, 3, 4, 4, 4, 4]
    indices, real = video.sample_indices_padded(100, 8, "uniform")
    assert real == 8 and list(indices) == [0, 12, 25, 37, 50, 62, 75, 87]
    indices, real = video.sample_indices_padded(5, 8, "headtail", np.random.default_rng(0))
    assert len(indices) == 8 and real == 5 and (indices[real:] == indices[real - 1]).all()


def test_bench_runs_and_seeking_wins(tmp_path):
    from vllama_jax.data import bench

    result = bench.run(num_clips=1, seconds=10.0, repeats=1, workdir=tmp_path)
    assert result["clips"] == 1 and result["ratio"] > 1.0
