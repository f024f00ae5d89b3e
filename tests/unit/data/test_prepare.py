"""`vllama-prepare`: real media in, ArrayRecord shards out; rejects, manifest, resume, parallel ingest."""
import hashlib
import json
import os

from array_record.python.array_record_module import ArrayRecordReader

from vllama_jax.data import records
from vllama_jax.data.prepare import prepare, shard_paths
from vllama_jax.data.synthetic import write_test_image, write_test_video


def read_shard(path):
    reader = ArrayRecordReader(str(path))
    out = [records.decode(r) for r in reader.read(0, reader.num_records())]
    reader.close()
    return out


def test_webvid_shards_manifest_and_rejects(webvid, tmp_path):
    root, csv_path, media = webvid
    manifest = prepare("webvid", csv_path, media, tmp_path, records_per_shard=2, log=lambda *_: None)
    assert manifest["items"] == 6 and manifest["records"] == 4 and manifest["rejected"] == 2
    assert [s["file"] for s in manifest["shards"]] == [f"webvid-{i:05d}-of-00003.array_record" for i in range(3)]
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rejects} == {"v1", "v3"}
    assert "No such file" in next(r["reason"] for r in rejects if r["id"] == "v1")
    samples = [s for p in shard_paths(tmp_path) for s in read_shard(p)]
    assert [s.id for s in samples] == ["v0", "v2", "v4", "v5"]
    for s in samples:  # the original encoded bytes, untouched
        assert s.media == (media / s.media_name).read_bytes()
    v2 = samples[1]
    assert (
        v2.kind == "video"
        and v2.num_frames == 14
        and v2.fps == 8.0
        and v2.has_audio
        and (v2.width, v2.height) == (64, 48)
    )
    assert not samples[2].has_audio
    assert samples[0].caption == b"A clip number 0."
    assert samples[3].caption == b"caf\xe9 bytes kept"  # invalid UTF-8 survives ingest for the pipeline to count
    for shard in manifest["shards"]:
        data = (tmp_path / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]


def test_resume_rewrites_only_unfinished_shards(webvid, tmp_path):
    root, csv_path, media = webvid
    prepare("webvid", csv_path, media, tmp_path, records_per_shard=2, log=lambda *_: None)
    done = tmp_path / "webvid-00000-of-00003.array_record"
    crashed = tmp_path / "webvid-00002-of-00003.array_record"
    os.utime(done, (1, 1))
    # a crash while writing shard 2: its summary never got written and a temporary file is left behind
    (tmp_path / f"{crashed.name}.json").unlink()
    crashed.rename(crashed.with_suffix(".tmp"))
    logs = []
    manifest = prepare("webvid", csv_path, media, tmp_path, records_per_shard=2, log=logs.append)
    assert "2 already done, 1 to write" in logs[0]
    assert done.stat().st_mtime == 1  # untouched
    assert crashed.exists() and not crashed.with_suffix(".tmp").exists()
    assert manifest["records"] == 4


def test_parallel_ingest_matches_serial(webvid, tmp_path):
    root, csv_path, media = webvid
    serial = prepare("webvid", csv_path, media, tmp_path / "serial", records_per_shard=2, log=lambda *_: None)
    parallel = prepare(
        "webvid", csv_path, media, tmp_path / "parallel", records_per_shard=2, workers=2, log=lambda *_: None
    )
    assert [s["sha256"] for s in serial["shards"]] == [s["sha256"] for s in parallel["shards"]]


def test_image_and_instruction_formats(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in (2, 3):
        write_test_image(images / f"{i}.jpg")
    (tmp_path / "filter_cap.json").write_text(
        json.dumps(
            {
                "annotations": [
                    {"image_id": "2", "caption": "A green square."},
                    {"image_id": "3", "caption": "Another one."},
                ]
            }
        )
    )
    m = prepare("image_caption", tmp_path / "filter_cap.json", images, tmp_path / "cc", log=lambda *_: None)
    (sample,) = read_shard(tmp_path / "cc" / m["shards"][0]["file"])[:1]
    assert sample.kind == "image" and sample.caption == b"A green square." and (sample.width, sample.height) == (40, 30)

    (tmp_path / "llava.json").write_text(
        json.dumps(
            [
                {
                    "id": "x1",
                    "image": "2.jpg",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat is it?"},
                        {"from": "gpt", "value": "A square."},
                    ],
                }
            ]
        )
    )
    m = prepare("llava_instruct", tmp_path / "llava.json", images, tmp_path / "llava", log=lambda *_: None)
    (sample,) = read_shard(tmp_path / "llava" / m["shards"][0]["file"])
    assert sample.conversation == [
        {"from": b"human", "value": b"<image>\nWhat is it?"},
        {"from": b"gpt", "value": b"A square."},
    ]

    videos = tmp_path / "videos"
    videos.mkdir()
    write_test_video(videos / "a.mp4", num_frames=10)
    (tmp_path / "vc.json").write_text(
        json.dumps([{"video": "a.mp4", "QA": [{"q": "What moves?", "a": "A red square."}]}])
    )
    m = prepare("videochat", tmp_path / "vc.json", videos, tmp_path / "vc", log=lambda *_: None)
    (sample,) = read_shard(tmp_path / "vc" / m["shards"][0]["file"])
    assert sample.kind == "video" and [t["from"] for t in sample.conversation] == [b"human", b"gpt"]
