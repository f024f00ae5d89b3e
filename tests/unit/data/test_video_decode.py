"""Frames as the original's decord 0.6.0 gives them (reference: decord itself, the test extra), on generated H.264
clips with the features real video has: B-frames, non-square pixels, odd sizes, rotation, variable frame rate,
full-range colour. Bound (issue 20): at most 1 level of 255 on every frame; measured 0 (bit-exact)."""
import av
import decord
import numpy as np
import pytest

from vllama_jax.data import media, video, video_decode
from vllama_jax.testing import media_reference


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature_clips")
    return {f: media_reference.write_feature_video(root / f"{f}.mp4", f) for f in media_reference.FEATURES}


def stream_facts(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        return {
            "bframes": any(int(f.pict_type) == 3 for f in frames),
            "sar": stream.codec_context.sample_aspect_ratio,
            "rotation": frames[0].rotation,
            "pts_steps": set(np.diff([f.pts for f in frames]).tolist()),
            "size": (frames[0].height, frames[0].width),
            "format": frames[0].format.name,
        }


@pytest.mark.parametrize("feature", media_reference.FEATURES)
def test_every_frame_matches_decord(clips, feature):
    path = clips[feature]
    facts = stream_facts(path)
    assert facts["bframes"]  # decode order differs from presentation order in every clip
    assert {  # the feature is really there
        "sar": facts["sar"] is not None and facts["sar"] != 1,
        "odd_size": facts["size"][0] % 2 == 1 and facts["size"][1] % 2 == 1,
        "rotate90": facts["rotation"] == -90,
        "rotate180": abs(facts["rotation"]) == 180,
        "rotate270": facts["rotation"] == 90,
        "vfr": len(facts["pts_steps"]) > 1,
        "yuvj_full_range": facts["format"] == "yuvj420p",
    }.get(feature, True)
    reader = decord.VideoReader(str(path), width=224, height=224)
    count = len(reader)
    assert video.count_frames(path) == count
    every = list(range(count))
    reference = reader.get_batch(every).asnumpy()
    ours, fps = video.read_frames_seeking(path, every, 224)
    assert fps == pytest.approx(reader.get_avg_fps())
    assert ours.shape == reference.shape
    assert np.abs(ours.astype(int) - reference).max() <= 1  # measured: 0
    # seeking to a scattered, repeating subset gives the same frames; so does decoding in stream order
    subset = [count - 1, 3, 17, 3, 0, 11]
    np.testing.assert_array_equal(video.read_frames_seeking(path.read_bytes(), subset, 224, name="x")[0],
                                  ours[subset])
    np.testing.assert_array_equal(video.read_frames(path, subset, 224)[0], ours[subset])


def test_rotation_turns_the_picture_and_native_size_follows_it(clips):
    upright = video.read_frames_seeking(clips["bframes"], [0], None)[0][0]
    turned = video.read_frames_seeking(clips["rotate90"], [0], None)[0][0]
    assert upright.shape == (72, 96, 3) and turned.shape == (96, 72, 3)
    # the green marker block in the top-left corner of the picture is in the top-right once turned clockwise
    assert turned[:10, -10:, 1].mean() > 180 and turned[:10, :10, 1].mean() < 180
    # the same picture turned (not bit for bit: the transpose runs on subsampled chroma, before the RGB conversion)
    assert np.abs(turned.astype(int) - np.rot90(upright, k=-1)).mean() < 2


def test_variable_frame_rate_indexes_frames_by_time_stamp_order(clips):
    """decord's frame i is the i-th presentation time stamp; time × average fps would skip and repeat frames."""
    path = clips["vfr"]
    with av.open(str(path)) as container:
        table = video_decode.frame_table(container, str(path))
        stream = container.streams.video[0]
        by_time = [round(p * stream.time_base * stream.average_rate) for p in table.pts]
    assert by_time != list(range(table.count))
    frames, indices, _ = video.read_sampled(path, lambda n: video.frame_indices(n, 8), 224)
    reference = media_reference.decord_frames(path, indices)
    np.testing.assert_array_equal(frames, reference)


@pytest.mark.parametrize("feature", ["bframes", "vfr", "rotate270"])
def test_load_video_and_chat_frames_match_the_original(clips, feature):
    """The original's load_video(…, 224, 224, 'uniform') + AlproVideoEvalProcessor, normalised values."""
    path = clips[feature]
    reference, indices, fps = media_reference.original_load_video(path, 8, 224)
    np.testing.assert_allclose(video.load_video(path, 8, 224), reference, atol=1e-6)
    frames, seconds = media.video_frames(path, 8, 224)
    np.testing.assert_allclose(frames, reference, atol=1e-6)
    assert seconds == [i / fps for i in indices]  # the prompt's times: index / average fps, as the original


def test_a_short_video_repeats_its_last_frame(clips):
    path = clips["bframes"]  # 30 frames
    frames, seconds = media.video_frames(path, 40, 32)
    assert frames.shape == (40, 32, 32, 3) and len(seconds) == 30
    np.testing.assert_array_equal(frames[30:], np.repeat(frames[29:30], 10, axis=0))
