"""The grain pipeline over real shards: shapes, labels, resume, per-host slices, workers, bad input counted."""
import dataclasses

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from vllama_jax.constants import IGNORE_INDEX
from vllama_jax.data import records
from vllama_jax.data.pipeline import PipelineConfig, make_dataset, reason_counts
from vllama_jax.data.records import Sample, probe_media
from vllama_jax.data.synthetic import write_test_image, write_test_video
from vllama_jax.data.tokenizer import build_bpe_tokenizer, load_tokenizer

SIZE = 28


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = build_bpe_tokenizer(["a red square moves", "what moves in the video"] * 4, vocab_size=300)
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return load_tokenizer(path)


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
    base = dict(batch_size=4, image_size=SIZE, num_frames=4, num_soft_tokens=4,
                image_token_id=tokenizer.convert_tokens_to_ids("<ImageHere>"), max_txt_len=8, text_length=1 + 4 + 8, seed=7)
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


def test_epoch_order_is_a_seeded_global_shuffle(shards, tokenizer):
    cfg = config(tokenizer, num_epochs=1, batch_size=1)
    ids = lambda seed: [tuple(b["input_ids"][0]) for b in make_dataset(shards, dataclasses.replace(cfg, seed=seed), tokenizer)]  # noqa: E731
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
        Sample("truncated", "test", "video", data[: len(data) // 3], "truncated.mp4", caption=b"x", num_frames=12, fps=8.0),
        video_sample(good, 2, caption=b"   ...  "),
        video_sample(good, 3, caption=b"caf\xe9"),
        video_sample(short, 4),
        video_sample(good, 5),
    ]
    image = write_test_image(tmp_path / "tiny.jpg", size=(3, 2))
    bad.append(Sample("img", "test", "image", image.read_bytes(), "tiny.jpg", caption=b"a tiny image", **probe_media(image.read_bytes(), "image")))
    path = tmp_path / "bad.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for sample in bad:
        writer.write(records.encode(sample))
    writer.write(b"not msgpack at all \xff")
    writer.close()
    cfg = config(tokenizer, num_epochs=1, batch_size=8)
    (batch,) = list(make_dataset([str(path)], cfg, tokenizer))
    counts = reason_counts(batch)
    assert counts["examples"] == 3  # the short video (repaired), the good one, the image
    assert counts["skipped/media_unreadable"] == 2
    assert counts["skipped/caption_empty"] == 1 and counts["skipped/caption_not_utf8"] == 1
    assert counts["skipped/record_corrupt"] == 1
    assert counts["repaired/few_frames_repeated"] == 1
    skipped = ~batch["example_mask"]
    assert (batch["labels"][skipped] == IGNORE_INDEX).all() and not batch["frames"][skipped].any()
    assert (batch["input_ids"][:, 1:5] == cfg.image_token_id).all()  # the model's splice still lines up
