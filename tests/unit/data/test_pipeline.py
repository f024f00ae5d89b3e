"""The grain pipeline over real shards: shapes, labels, resume, per-host slices, workers, bad input counted."""
import dataclasses

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.data import records
from vllama_jax.data.pipeline import ExampleBuilder, PipelineConfig, make_dataset, reason_counts
from vllama_jax.data.records import Sample, probe_media
from vllama_jax.data.synthetic import write_test_image, write_test_video

SIZE = 28


def video_sample(path, i, caption=b"a red square moves", **kw):
    data = path.read_bytes()
    return Sample(f"v{i}", "test", "video", data, path.name, caption=caption, **probe_media(data, "video"), **kw)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards of 12 good clips (varied lengths, with audio)."""
    root = tmp_path_factory.mktemp("shards")
    paths = []
    for s in range(2):
        path = root / f"good-{s}.array_record"
        writer = ArrayRecordWriter(str(path), "group_size:1")
        for i in range(6):
            clip = write_test_video(root / f"c{s}{i}.mp4", num_frames=10 + 3 * i, fps=8)
            writer.write(records.encode(video_sample(clip, s * 6 + i, caption=f"clip {s * 6 + i} moves".encode())))
        writer.close()
        paths.append(str(path))
    return paths


def config(tokenizer, **kw):
    base = dict(
        batch_size=4,
        image_size=SIZE,
        num_frames=4,
        num_soft_tokens=4,
        image_token_id=tokenizer.convert_tokens_to_ids("<ImageHere>"),
        max_txt_len=8,
        text_length=1 + 4 + 8,
        seed=7,
    )
    return PipelineConfig(**{**base, **kw})


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batches_have_static_shapes_and_caption_labels(shards, tokenizer):
    cfg = config(tokenizer, with_audio=True, clips_per_video=2)
    batch = next(iter(make_dataset(shards, cfg, tokenizer)))
    assert batch["frames"].shape == (4, 4, SIZE, SIZE, 3) and batch["frames"].dtype == np.float32
    assert batch["audio"].shape == (4, 2, 1, 128, 204) and batch["audio_mask"].all()
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 13)
    assert (batch["input_ids"][:, 1:5] == cfg.image_token_id).all()
    assert (batch["labels"][:, :5] == IGNORE_INDEX).all() and (batch["labels"][:, 5] != IGNORE_INDEX).all()
    assert reason_counts(batch)["examples"] == 4
    # normalised CLIP pixels: the dark background is about (16/255 - mean) / std
    assert -1.8 < float(np.median(batch["frames"][..., 2])) < -1.2


def test_a_crop_range_outside_the_frame_is_refused():
    for scale in ((0.5, 1.5), (0.0, 1.0), (0.9, 0.5)):
        with pytest.raises(ValueError, match=r"crop_scale .*0 < min <= max <= 1"):
            PipelineConfig(batch_size=1, crop_scale=scale)
    assert PipelineConfig(batch_size=1, crop_scale=(1.0, 1.0)).crop_scale == (1.0, 1.0)


def test_epoch_order_is_a_seeded_global_shuffle(shards, tokenizer):
    cfg = config(tokenizer, num_epochs=1, batch_size=1)
    ids = lambda seed: [
        tuple(b["input_ids"][0]) for b in make_dataset(shards, dataclasses.replace(cfg, seed=seed), tokenizer)
    ]  # noqa: E731
    first, again, other = ids(7), ids(7), ids(8)
    assert len(first) == 12 and first == again and first != other


def test_resume_continues_with_the_next_batch(shards, tokenizer):
    ds = make_dataset(shards, config(tokenizer), tokenizer)
    it = iter(ds)
    take(it, 2)
    state = it.get_state()
    expected = take(it, 3)
    resumed = iter(make_dataset(shards, config(tokenizer), tokenizer))
    resumed.set_state(state)
    for a, b in zip(expected, take(resumed, 3)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_two_hosts_read_disjoint_halves(shards, tokenizer):
    cfg = config(tokenizer, num_epochs=1, batch_size=1)
    seen = []
    for index in range(2):
        ds = make_dataset(shards, cfg, tokenizer, process_index=index, process_count=2)
        seen.append([tuple(b["input_ids"][0]) for b in ds])
    assert len(seen[0]) == len(seen[1]) == 6
    assert not set(seen[0]) & set(seen[1])
    everything = [tuple(b["input_ids"][0]) for b in make_dataset(shards, cfg, tokenizer)]
    assert sorted(seen[0] + seen[1]) == sorted(everything)


def test_worker_processes_give_the_same_batches(shards, tokenizer):
    single = take(iter(make_dataset(shards, config(tokenizer), tokenizer)), 3)
    workers = take(iter(make_dataset(shards, config(tokenizer, worker_count=2), tokenizer)), 3)
    for a, b in zip(single, workers):
        np.testing.assert_array_equal(a["frames"], b["frames"])
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_bad_inputs_are_counted_not_fatal(tmp_path, tokenizer):
    good = write_test_video(tmp_path / "good.mp4", num_frames=12)
    short = write_test_video(tmp_path / "short.mp4", num_frames=2)
    data = good.read_bytes()
    bad = [
        Sample("corrupt", "test", "video", b"\x00" * 500, "corrupt.mp4", caption=b"x", num_frames=12, fps=8.0),
        Sample(
            "truncated", "test", "video", data[: len(data) // 3], "truncated.mp4", caption=b"x", num_frames=12, fps=8.0
        ),
        video_sample(good, 2, caption=b"   ...  "),
        video_sample(good, 3, caption=b"caf\xe9"),
        video_sample(short, 4),
        video_sample(good, 5),
        # a stale frame count (an older vllama-prepare's estimate): frames are counted from the file, decord's way
        dataclasses.replace(video_sample(good, 6), num_frames=999),
    ]
    image = write_test_image(tmp_path / "tiny.jpg", size=(3, 2))
    bad.append(
        Sample(
            "img",
            "test",
            "image",
            image.read_bytes(),
            "tiny.jpg",
            caption=b"a tiny image",
            **probe_media(image.read_bytes(), "image"),
        )
    )
    path = tmp_path / "bad.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for sample in bad:
        writer.write(records.encode(sample))
    writer.write(b"not msgpack at all \xff")
    writer.close()
    cfg = config(tokenizer, num_epochs=1, batch_size=len(bad) + 1)
    (batch,) = list(make_dataset([str(path)], cfg, tokenizer))
    counts = reason_counts(batch)
    assert counts["examples"] == 4  # the short video (repaired), the good one, the stale count, the image
    assert counts["skipped/media_unreadable"] == 2
    assert counts["skipped/caption_empty"] == 1 and counts["skipped/caption_not_utf8"] == 1
    assert counts["skipped/record_corrupt"] == 1
    assert counts["repaired/few_frames_repeated"] == 1
    (short_mask,) = batch["frame_mask"][(batch["repairs"] & 1) != 0]  # its repeated last frame is not read
    assert short_mask[0] and not short_mask[-1] and list(short_mask) == sorted(short_mask, reverse=True)
    skipped = ~batch["example_mask"]
    assert (batch["labels"][skipped] == IGNORE_INDEX).all() and not batch["frames"][skipped].any()
    assert (batch["input_ids"][:, 1:5] == cfg.image_token_id).all()  # the model's splice still lines up


def test_an_image_is_a_one_frame_video_by_its_frame_mask(tmp_path, tokenizer):
    """Fixed shapes: an image fills all num_frames frames with copies of itself, and frame_mask says only frame 0
    is real (the model reads that one alone: SPEC §3); a video's frames are all real."""
    image = write_test_image(tmp_path / "img.jpg", size=(40, 30))
    clip = write_test_video(tmp_path / "clip.mp4", num_frames=12)
    path = tmp_path / "mixed.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    writer.write(
        records.encode(
            Sample(
                "img",
                "test",
                "image",
                image.read_bytes(),
                "img.jpg",
                caption=b"a green image",
                **probe_media(image.read_bytes(), "image"),
            )
        )
    )
    writer.write(records.encode(video_sample(clip, 1)))
    writer.close()
    for train in (True, False):
        (batch,) = list(
            make_dataset([str(path)], config(tokenizer, num_epochs=1, batch_size=2, train=train), tokenizer)
        )
        assert batch["example_mask"].all() and batch["frame_mask"].shape == (2, 4) and batch["frame_mask"].dtype == bool
        is_image = np.array([not (clip_frames != clip_frames[0]).any() for clip_frames in batch["frames"]])
        assert is_image.sum() == 1  # the image's copies are one frame; the moving square's frames differ
        np.testing.assert_array_equal(batch["frame_mask"][is_image][0], [True, False, False, False])
        assert batch["frame_mask"][~is_image].all()
    assert ExampleBuilder(config(tokenizer), tokenizer).empty()["frame_mask"].all()  # a skipped example: all real


def test_broken_audio_becomes_silence_and_is_counted(shards, tokenizer, monkeypatch):
    from vllama_jax.data import audio

    def broken(*args, **kwargs):
        raise ValueError("clip.mp4: cannot decode audio (Invalid data found when processing input)")

    monkeypatch.setattr(audio, "load_audio_clips", broken)
    batch = next(iter(make_dataset(shards, config(tokenizer, with_audio=True, clips_per_video=2), tokenizer)))
    assert batch["example_mask"].all() and not batch["audio_mask"].any() and not batch["audio"].any()
    assert reason_counts(batch)["repaired/audio_unreadable_silenced"] == 4


def test_prompts_wrap_the_soft_tokens(shards, tokenizer):
    cfg = config(
        tokenizer, prompts=("look <ImageHere> now", "<ImageHere> here"), text_length=24, num_epochs=1, batch_size=12
    )
    (batch,) = list(make_dataset(shards, cfg, tokenizer))
    first_label = [int(np.flatnonzero(row != IGNORE_INDEX)[0]) for row in batch["labels"]]
    assert len(set(first_label)) == 2  # both prompts were drawn; their tokens are never labels
    placeholders = batch["input_ids"] == cfg.image_token_id
    assert (placeholders.sum(axis=1) == 4).all()


HOST_SCRIPT = """
import json, sys
from vllama_jax.data.pipeline import PipelineConfig, make_dataset
from vllama_jax.data.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1])
cfg = PipelineConfig(batch_size=1, image_size=28, num_frames=4, num_soft_tokens=4, max_txt_len=8, text_length=13,
                     image_token_id=tok.convert_tokens_to_ids("<ImageHere>"), seed=7, num_epochs=1)
seen = [b["input_ids"][0].tolist() for b in make_dataset(json.loads(sys.argv[2]), cfg, tok,
                                                         process_index=int(sys.argv[3]), process_count=2)]
print(json.dumps(seen))
"""


def test_two_processes_read_disjoint_halves(shards, tokenizer, tmp_path):
    import json
    import subprocess
    import sys

    tokenizer.save_pretrained(tmp_path / "tok")
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", HOST_SCRIPT, str(tmp_path / "tok"), json.dumps(shards), str(i)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    halves = [json.loads(run.communicate(timeout=120)[0]) for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert len(halves[0]) == len(halves[1]) == 6
    assert not {tuple(x) for x in halves[0]} & {tuple(x) for x in halves[1]}
