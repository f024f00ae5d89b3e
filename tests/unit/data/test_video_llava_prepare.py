"""`vllama-prepare --format=video_llava`: Video-LLaVA's LLaVA-style annotation files (image, video or text-only
conversations) become shards of the original bytes; a missing file and a several-media sample are rejected by name."""
import json

from array_record.python.array_record_module import ArrayRecordReader

from vllama_jax.data import records
from vllama_jax.data.prepare import prepare, shard_paths
from vllama_jax.data.synthetic import write_test_image, write_test_video


def test_image_video_and_text_only_conversations(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    write_test_image(media / "cat.jpg")
    write_test_video(media / "clip.mp4", num_frames=10, tone_hz=None)
    turns = [{"from": "human", "value": "<video>\nwhat happens"}, {"from": "gpt", "value": "a square moves"}]
    annotations = [
        {"id": "v", "video": "clip.mp4", "conversations": turns},
        {"id": "i", "image": ["cat.jpg"], "conversations": [{"from": "human", "value": "<image>\nq"},
                                                             {"from": "gpt", "value": "a"}]},
        {"id": "t", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]},
        {"id": "gone", "image": "missing.jpg", "conversations": turns},
        {"id": "two", "image": "cat.jpg", "video": "clip.mp4", "conversations": turns},
    ]
    path = tmp_path / "videochatgpt_tune_.json"
    path.write_text(json.dumps(annotations))
    manifest = prepare("video_llava", path, media, tmp_path / "out", log=lambda *_: None)
    assert (manifest["items"], manifest["records"], manifest["rejected"]) == (5, 3, 2)
    rejects = {r["id"]: r["reason"] for r in map(json.loads, (tmp_path / "out/rejects.jsonl").read_text().splitlines())}
    assert "No such file" in rejects["gone"] and "2 media in one sample" in rejects["two"]
    reader = ArrayRecordReader(shard_paths(tmp_path / "out")[0])
    samples = {s.id: s for s in map(records.decode, reader.read(0, reader.num_records()))}
    reader.close()
    assert {k: s.kind for k, s in samples.items()} == {"v": "video", "i": "image", "t": "text"}
    assert samples["v"].media == (media / "clip.mp4").read_bytes() and samples["v"].num_frames == 10
    assert samples["t"].media == b"" and samples["t"].conversation[1] == {"from": b"gpt", "value": b"hi"}
