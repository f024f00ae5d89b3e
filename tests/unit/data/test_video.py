"""Video frames (`data/video.py`): the original's frame indices, seeking decode equal to decoding every frame, errors
that name the source, odd sizes, the bicubic resize and RandomResizedCrop as PyTorch computes them."""
import math
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from vllama_jax.data import video, video_decode
from vllama_jax.data.synthetic import write_test_video


def test_frame_indices():
    assert list(video.frame_indices(24, 8)) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert list(video.frame_indices(10, 8)) == [0, 1, 2, 3, 5, 6, 7, 8]  # arange(0, 10, 1.25) cast to int
    ht = video.frame_indices(20, 8, "headtail", np.random.default_rng(0))
    assert len(ht) == 8 and (ht[:4] < 10).all() and (ht[4:] >= 10).all() and (np.diff(ht[:4]) > 0).all()


def test_decode_real_mp4(tmp_path):
    path = write_test_video(tmp_path / "clip.mp4", num_frames=16, size=(64, 48), fps=8)
    assert video.count_frames(path) == 16
    frames, fps = video.read_frames(path, [0, 15], 28)
    assert frames.shape == (2, 28, 28, 3) and fps == 8.0
    # the red square moves from the left edge to the right edge
    red = frames[..., 0].astype(int) - frames[..., 2].astype(int)
    cols = [np.flatnonzero(r.max(axis=0) > 100).mean() for r in red]
    assert cols[0] < 10 < 18 < cols[1]
    x = video.load_video(path, 8, 28)
    assert x.shape == (8, 28, 28, 3) and x.dtype == np.float32
    np.testing.assert_allclose(video.normalize(np.full((1, 1, 1, 3), 255, np.uint8))[0, 0, 0],
                               (1 - np.array(video.CLIP_MEAN)) / np.array(video.CLIP_STD), rtol=1e-6)
    with pytest.raises(ValueError, match="past the end"):
        video.read_frames(path, [99], 28)


def test_unreadable_video_names_the_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(Exception, match="broken.mp4"):
        video.read_frames(bad, [0], 28)


def encode(path, frames, fps=25, pix_fmt="yuv420p", gop=None, bframes=None, pts_offset=0, options=None, fmt=None,
           container_options=None):
    """Write rgb24 frames (T, H, W, 3) as H.264 with PyAV. gop: keyframe interval; bframes: max B-frames (libx264
    uses 3 by default); pts_offset: the first frame's presentation time in frames; options: codec options;
    fmt, container_options: the container's format and muxer options."""
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if gop:
            stream.codec_context.gop_size = gop
        if bframes is not None:
            stream.codec_context.max_b_frames = bframes
        if options:
            stream.options = options
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = pts_offset + i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 16000, 0, Fraction(1, 16000)
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)
    return path


def distinct_frames(n, h=48, w=64):
    """Frames that move smoothly (so libx264 uses B-frames: a bar sliding over a gradient) and carry their own
    index as 8 black/white blocks along the bottom (when h >= 16 and w >= 64), which coding noise cannot flip."""
    base = np.broadcast_to(np.linspace(20, 160, w, dtype=np.uint8)[None, :, None], (h, w, 3))
    frames = np.repeat(base[None], n, 0).copy()
    for t in range(n):
        frames[t, :, t % max(1, w - 6):t % max(1, w - 6) + 6] = (250, 120, 20)
        if h >= 16 and w >= 64:
            for bit in range(8):
                frames[t, -8:, bit * 8:bit * 8 + 8] = 255 if (t >> bit) & 1 else 0
    return frames


def frame_numbers(frames):
    """The indices written by distinct_frames, read back from decoded (T, h, 64, 3) frames."""
    strip = frames[:, -6:-2, :, :].astype(float).mean(axis=(1, 3))  # inner rows, away from block edges
    bits = np.stack([strip[:, b * 8 + 2:b * 8 + 6].mean(axis=1) > 128 for b in range(8)], axis=1)
    return list((bits * (1 << np.arange(8))).sum(axis=1))


def picture_types(path):
    with av.open(str(path)) as container:
        return [int(f.pict_type) for f in container.decode(video=0)]  # 1 = I, 2 = P, 3 = B


INDICES = [0, 149, 13, 13, 74, 75, 100, 3, 11, 12, 49, 50, 51, 140, 141, 99, 0, 148]


@pytest.mark.parametrize("kind", ["gop12", "gop50", "x264-default", "no-bframes", "pts-offset", "mpegts", "open-gop"])
def test_seeking_gives_the_same_pixels_as_full_decoding(tmp_path, kind):
    frames = distinct_frames(150)
    suffix = ".ts" if kind == "mpegts" else ".mp4"
    args = {
        "gop12": dict(gop=12),
        "gop50": dict(gop=50),
        "x264-default": dict(),  # keyint 250: one GOP; B-frames on
        "no-bframes": dict(gop=12, bframes=0),
        "pts-offset": dict(gop=12, pts_offset=7),  # first pts is 7 frames in: an mp4 whose start_time is not 0
        "mpegts": dict(gop=12),  # no index, timestamps start at 0.08 s (MPEG-TS muxer delay)
        "open-gop": dict(gop=12, options={"x264-params": "open-gop=1"}),  # leading B-frames need the previous GOP
    }[kind]
    path = encode(tmp_path / f"clip{suffix}", frames, **args)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = stream.start_time
        if kind in ("pts-offset", "mpegts"):
            assert start != 0
    assert (3 in picture_types(path)) == (kind != "no-bframes")  # B-frames: decode order != presentation order
    full, fps_full = video.read_frames(path, INDICES, 32)
    seek, fps_seek = video.read_frames_seeking(path, INDICES, 32)
    from_bytes, _ = video.read_frames_seeking(path.read_bytes(), INDICES, 32, name="clip")
    assert fps_full == fps_seek == 25.0
    np.testing.assert_array_equal(seek, full)
    np.testing.assert_array_equal(from_bytes, full)
    # the frames are the right ones, not merely consistent with read_frames
    native, _ = video.read_frames_seeking(path, INDICES, None)
    assert native.shape == (len(INDICES), 48, 64, 3)
    assert frame_numbers(native) == INDICES


def moving_bar(n, h=32, w=32):
    """Smooth content (a bar sliding over a gradient), so the encoder adds no scene-cut keyframes."""
    frames = np.broadcast_to(np.linspace(20, 120, w, dtype=np.uint8)[None, None, :, None], (n, h, w, 3)).copy()
    for t in range(n):
        frames[t, :, (t // 4) % (w - 4):(t // 4) % (w - 4) + 4] = (250, 120, 20)
    return frames


NO_SCENECUT = {"x264-params": "scenecut=0"}  # keyframes only every gop frames


def true_keyframes(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start, rate, tb = stream.start_time, stream.average_rate, stream.time_base
        return [round((f.pts - start) * tb * rate) for f in container.decode(stream) if f.key_frame]


def open_decoder(path):
    container = av.open(str(path))
    table = video_decode.frame_table(container, str(path))
    return video_decode._SeekingDecoder(container, str(path), table, reopen=lambda: av.open(str(path)))


def test_seeking_decodes_only_part_of_a_long_clip(tmp_path):
    path = encode(tmp_path / "long.mp4", moving_bar(300), gop=50, options=NO_SCENECUT)  # 12 s at 25 fps, 2-s GOPs
    keyframes = true_keyframes(path)
    assert len(keyframes) == 6
    indices = video.frame_indices(300, 8)  # 0, 37, 75, ... 262: closer together than one GOP
    decoder = open_decoder(path)
    assert list(decoder.table.keyframes) == keyframes  # from the packets' flags, without decoding
    for target in indices:
        assert decoder.table.index_of(decoder.get(target).pts, None) == target
    # it decodes on when no keyframe lies between (0 -> 37, 150 -> 187 with keyframes every ~50) and seeks else
    assert 4 <= decoder.seeks <= 7
    assert decoder.decoded_frames < 0.65 * 300, decoder.decoded_frames
    decoder.container.close()
    # an index-less container (MPEG-TS): the keyframes come from the packets all the same
    ts = encode(tmp_path / "long.ts", moving_bar(300), gop=50, options=NO_SCENECUT)
    decoder = open_decoder(ts)
    got = [decoder.table.index_of(decoder.get(t).pts, None) for t in indices]
    decoder.container.close()
    assert got == list(indices) and decoder.decoded_frames < 300, decoder.decoded_frames
    full, _ = video.read_frames(ts, indices, 32)
    np.testing.assert_array_equal(video.read_frames_seeking(ts, indices, 32)[0], full)


def test_errors_name_the_source(tmp_path):
    good = encode(tmp_path / "good.mp4", distinct_frames(16), gop=8)
    data = good.read_bytes()
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01garbage" * 40)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])  # the mp4 index (moov) is at the end: it is lost
    audio_only = write_audio_only(tmp_path / "audio_only.m4a")
    cases = [
        (corrupt, r"corrupt\.mp4: cannot decode"),
        (truncated, r"truncated\.mp4: cannot decode"),
        (audio_only, r"audio_only\.m4a: no video stream"),
    ]
    for path, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            video.read_frames_seeking(path, [0], 28)
        with pytest.raises(ValueError, match=r"<bytes> item-7: (cannot decode|no video stream)"):
            video.read_frames_seeking(path.read_bytes(), [0], 28, name="item-7")
    with pytest.raises(ValueError, match=r"<bytes>: cannot decode"):
        video.read_frames_seeking(b"", [0], 28)
    with pytest.raises(ValueError, match=r"good\.mp4: frame 16 is past the end of the video \(last frame 15\)"):
        video.read_frames_seeking(good, [3, 16], 28)
    with pytest.raises(ValueError, match=r"<bytes> g: frame 99 is past the end"):
        video.read_frames_seeking(data, [99], 28, name="g")
    with pytest.raises(ValueError, match=r"good\.mp4: negative frame index"):
        video.read_frames_seeking(good, [-1], 28)
    # a video stream without a single frame (libx264 in mp4 drops a stream that never got a packet; an AVI
    # keeps it, and its empty index makes seeking fail, so this also covers the decode-from-the-start fallback)
    empty = tmp_path / "empty.avi"
    with av.open(str(empty), "w") as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuvj420p"
        container.start_encoding()
    with av.open(str(empty)) as container:
        assert len(container.streams.video) == 1 and container.streams.video[0].frames == 0
    with pytest.raises(ValueError, match=r"empty\.avi: the video has no frames"):
        video.read_frames_seeking(empty, [0], 28)
    # a cut stream whose index survived (moov first, as "faststart" files have): decoding fails at the cut
    faststart = encode(tmp_path / "fast.mp4", distinct_frames(60), gop=10, container_options={"movflags": "faststart"})
    cut = faststart.read_bytes()
    assert cut[4:8] == b"ftyp" and cut[36:40] == b"moov"
    with pytest.raises(ValueError, match=r"<bytes> cut: (frame 59 is past the end|cannot decode)"):
        video.read_frames_seeking(cut[: len(cut) // 2], [0, 59], 28, name="cut")


def test_grayscale_sources_give_three_equal_channels(tmp_path):
    gray = np.repeat(distinct_frames(6, 32, 16)[..., :1], 3, axis=-1)
    for pix_fmt in ("gray", "yuv420p"):  # 4:0:0 H.264, and 4:2:0 whose chroma is neutral (grey input)
        path = encode(tmp_path / f"{pix_fmt}.mp4", gray, pix_fmt=pix_fmt)
        frames, _ = video.read_frames_seeking(path, [0, 5, 2], 28)
        assert frames.shape == (3, 28, 28, 3)
        assert (frames[..., 0] == frames[..., 1]).all() and (frames[..., 1] == frames[..., 2]).all()
        np.testing.assert_array_equal(frames, video.read_frames(path, [0, 5, 2], 28)[0])


def test_odd_and_tiny_sizes(tmp_path):
    # 4:2:0 needs even sizes in libx264, so odd sizes are written 4:4:4; 1x1 is accepted in 4:4:4
    for h, w in [(17, 33), (1, 1), (2, 2)]:
        frames = distinct_frames(5, h, w)
        path = encode(tmp_path / f"{h}x{w}.mp4", frames, pix_fmt="yuv444p")
        out, _ = video.read_frames_seeking(path, [4, 0], 28)
        assert out.shape == (2, 28, 28, 3)
        np.testing.assert_array_equal(out, video.read_frames(path, [4, 0], 28)[0])
        assert video.read_frames_seeking(path, [1], None)[0].shape == (1, h, w, 3)
        assert video.eval_transform(out).shape == (2, 28, 28, 3)


def test_4k_frames_decode_to_the_model_size(tmp_path):
    path = encode(tmp_path / "4k.mp4", np.full((2, 2160, 3840, 3), 90, np.uint8))
    frames, _ = video.read_frames_seeking(path, [1], 28)
    assert frames.shape == (1, 28, 28, 3) and abs(int(frames.mean()) - 90) <= 3


def torch_bicubic(x, size):
    return torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("shape", [(37, 23, 28, 28), (20, 30, 224, 224), (224, 224, 28, 28), (160, 213, 224, 224),
                                   (1, 1, 5, 5), (2, 9, 3, 4)])
def test_bicubic_matches_torch(shape):
    h, w, out_h, out_w = shape
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, h, w, 3))
    assert np.abs(video.resize_bicubic(x, (out_h, out_w)) - torch_bicubic(x, (out_h, out_w))).max() <= 1e-4
    # the original resizes float32 frames: PyTorch's float32 arithmetic (coordinates, weights, sums) is
    # followed for the coordinates and weights only, so allow float32-level differences
    x32 = x.astype(np.float32)
    assert np.abs(video.resize_bicubic(x32, out_h, out_w) - torch_bicubic(x32, (out_h, out_w))).max() <= 1e-3
    u8 = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    ours = video.resize_bicubic(u8, (out_h, out_w))
    assert np.abs(ours - torch_bicubic(u8.astype(np.float32), (out_h, out_w))).max() <= 1e-3
    if out_h == out_w:
        np.testing.assert_array_equal(video.resize_bicubic(x, out_h), video.resize_bicubic(x, (out_h, out_w)))


class ScriptedRng:
    """Returns scripted uniform draws, and the low end for integers, to compare with a transliteration."""

    def __init__(self, uniforms):
        self.uniforms = list(uniforms)

    def uniform(self, low, high):
        return low + (high - low) * self.uniforms.pop(0)

    def integers(self, low, high):
        return high - 1


def torchvision_get_params(height, width, uniforms, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params, with its random draws taken from `uniforms`."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    uniforms = list(uniforms)
    for _ in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniforms.pop(0))
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniforms.pop(0))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return height - h, width - w, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_random_resized_crop_params():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = video.random_resized_crop_params(224, 224, rng)
        assert 0 <= top and top + h <= 224 and 0 <= left and left + w <= 224
        areas.append(h * w / 224**2)
        ratios.append(w / h)
    areas, ratios = np.array(areas), np.array(ratios)
    # rounding h and w to integers moves the area and ratio a little past the bounds
    assert areas.min() >= 0.5 * 0.98 and areas.max() <= 1.0
    assert ratios.min() >= 3 / 4 * 0.98 and ratios.max() <= 4 / 3 * 1.02
    assert 0.66 < areas.mean() < 0.74  # uniform in [0.5, 1] but large non-square boxes do not fit and are redrawn
    assert abs(np.log(ratios).mean()) < 0.02
    # the same decisions as torchvision for the same draws, including rejected tries and both fallbacks
    draw = np.random.default_rng(1)
    for height, width in [(224, 224), (240, 320), (100, 400), (400, 100), (17, 33), (1, 1)]:
        for _ in range(50):
            uniforms = draw.uniform(0, 1, 20)
            assert video.random_resized_crop_params(height, width, ScriptedRng(uniforms)) == torchvision_get_params(
                height, width, uniforms
            )
    assert video.random_resized_crop_params(10, 400, rng, scale=(0.99, 1.0)) == (0, 193, 10, 13)
    assert video.random_resized_crop_params(400, 10, rng, scale=(0.99, 1.0)) == (193, 0, 13, 10)


def clip_normalize(x):
    mean, std = torch.tensor(video.CLIP_MEAN, dtype=x.dtype), torch.tensor(video.CLIP_STD, dtype=x.dtype)
    return (x - mean) / std


def test_train_transform_matches_a_torch_reference():
    frames = np.random.default_rng(1).integers(0, 256, (4, 60, 80, 3), dtype=np.uint8)
    seed = 3
    ours = video.train_transform(frames, np.random.default_rng(seed), 32)
    top, left, h, w = video.random_resized_crop_params(60, 80, np.random.default_rng(seed))
    crop = torch.from_numpy(frames).double().permute(3, 0, 1, 2)[:, :, top : top + h, left : left + w]  # (C, T, H, W)
    resized = torch.nn.functional.interpolate(crop, size=(32, 32), mode="bicubic", align_corners=False)
    assert ((resized < 0) | (resized > 255)).any()  # bicubic overshoot on noise: the cast's two behaviours differ
    as_uint8 = resized.to(torch.uint8)  # the original's cast: out-of-range values wrap around
    reference = clip_normalize(as_uint8.permute(1, 2, 3, 0).float() / 255.0).numpy()
    assert ours.shape == (4, 32, 32, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    # the clean variant (data.wrap_uint8 = False) clips them
    clean = video.train_transform(frames, np.random.default_rng(seed), 32, wrap_uint8=False)
    reference = clip_normalize(resized.clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).float() / 255.0).numpy()
    np.testing.assert_allclose(clean, reference, atol=1e-5)
    assert not np.array_equal(clean, ours)
    # one crop box for the whole clip: identical frames stay identical
    same = video.train_transform(np.repeat(frames[:1], 3, axis=0), np.random.default_rng(0), 32)
    assert (same[0] == same[1]).all() and (same[1] == same[2]).all()
    # a narrower area range (data.crop_scale) reaches the crop box: the same draws, that range's box
    mild = video.train_transform(frames, np.random.default_rng(seed), 32, scale=(0.9, 1.0))
    top, left, h, w = video.random_resized_crop_params(60, 80, np.random.default_rng(seed), scale=(0.9, 1.0))
    assert h * w >= 0.88 * 60 * 80 and not np.array_equal(mild, ours)
    crop = torch.from_numpy(frames).double().permute(3, 0, 1, 2)[:, :, top : top + h, left : left + w]
    resized = torch.nn.functional.interpolate(crop, size=(32, 32), mode="bicubic", align_corners=False)
    reference = clip_normalize(resized.to(torch.uint8).permute(1, 2, 3, 0).float() / 255.0).numpy()
    np.testing.assert_allclose(mild, reference, atol=1e-5)


def test_the_clean_train_crop_cuts_the_native_frames_and_resizes_once():
    from PIL import Image

    frames = np.random.default_rng(2).integers(0, 256, (3, 90, 160, 3), dtype=np.uint8)
    ours = video.train_transform_native(frames, np.random.default_rng(4), 32)
    top, left, h, w = video.random_resized_crop_params(90, 160, np.random.default_rng(4))
    for frame, got in zip(frames, ours):
        crop = Image.fromarray(frame).crop((left, top, left + w, top + h)).resize((32, 32), Image.BICUBIC)
        reference = clip_normalize(torch.from_numpy(np.array(crop)).float() / 255.0).numpy()
        np.testing.assert_allclose(got, reference, atol=1e-6)


def test_eval_transform():
    frames = np.random.default_rng(1).integers(0, 256, (8, 28, 28, 3), dtype=np.uint8)
    reference = clip_normalize(torch.from_numpy(frames).float() / 255.0).numpy()
    np.testing.assert_allclose(video.eval_transform(frames), reference, atol=1e-6)
    np.testing.assert_array_equal(video.eval_transform(frames, 28), video.eval_transform(frames))
    with pytest.raises(ValueError, match="decode them at that size"):
        video.eval_transform(frames[:, :10, :20], 28)  # another resize would not be decord's


def test_sample_indices_padded():
    indices, real = video.sample_indices_padded(5, 8, "uniform")
    assert real == 5 and list(indices) == [0, 1, 2, 3, 4, 4, 4, 4]
    indices, real = video.sample_indices_padded(1, 8, "uniform")
    assert real == 1 and list(indices) == [0] * 8
    indices, real = video.sample_indices_padded(100, 8, "uniform")
    assert real == 8 and list(indices) == list(video.frame_indices(100, 8)) == [0, 12, 25, 37, 50, 62, 75, 87]
    for vlen in (2, 5, 7):
        indices, real = video.sample_indices_padded(vlen, 8, "headtail", np.random.default_rng(vlen))
        assert len(indices) == 8 and real == vlen and (indices[real:] == indices[real - 1]).all()
        assert sorted(set(indices)) == list(range(vlen))  # all of a short video's frames, as the original
    assert len(video.frame_indices(5, 8)) == 8  # frame_indices itself keeps returning n_frms indices
