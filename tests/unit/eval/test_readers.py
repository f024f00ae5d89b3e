"""The released benchmark formats (vllama_jax/eval/readers.py) on small files written here, with real mp4s; bad
input names the file and the entry, and mismatched answer files are refused."""
import json

import numpy as np
import pytest

from vllama_jax.eval import readers
from vllama_jax.eval.readers import FormatError


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from vllama_jax.data.synthetic import write_shape_video

    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    write_shape_video(folder / "v0.mp4", "red", "circle", "from left to right", rng, size=32, num_frames=8)
    write_shape_video(folder / "v1.avi", "blue", "square", "from top to bottom", rng, size=32, num_frames=8)
    return folder


def test_video_chatgpt_pairs_questions_with_answers_and_finds_each_videos_extension(clips, tmp_path):
    (tmp_path / "test_q.json").write_text(json.dumps([
        {"video_name": "v0", "question_id": "v0_1", "question": "what colour is it?"},
        {"video_name": "v1", "question_id": "v1_1", "question": "what shape is it?"},
        {"video_name": "gone", "question_id": "gone_1", "question": "what is it?"},
    ]))
    (tmp_path / "test_a.json").write_text(json.dumps([
        {"answer": "red", "type": 3, "question_id": "v0_1"},
        {"answer": "square", "type": 2, "question_id": "v1_1"},
        {"answer": "nothing", "type": 2, "question_id": "gone_1"},
    ]))
    task, examples = readers.read_examples(tmp_path, videos=clips)
    assert task == "open_qa"
    assert [(e.id, e.answer, e.category) for e in examples] == [("v0_1", "red", "3"), ("v1_1", "square", "2"),
                                                                ("gone_1", "nothing", "2")]
    assert examples[0].video == str(clips / "v0.mp4") and examples[1].video == str(clips / "v1.avi")
    assert examples[2].video == str(clips / "gone.mp4")  # kept: the run reports the missing video

    answers = json.loads((tmp_path / "test_a.json").read_text())
    answers[1]["question_id"] = "v0_2"
    (tmp_path / "test_a.json").write_text(json.dumps(answers))
    with pytest.raises(FormatError, match=r"test_a\.json entry 1 answers question_id 'v0_2'.*do not match"):
        readers.read_examples(tmp_path / "test_q.json", videos=clips)
    (tmp_path / "test_a.json").write_text(json.dumps(answers[:2]))
    with pytest.raises(FormatError, match="2 answers for the 3 questions"):
        readers.read_examples(tmp_path, videos=clips)


def test_jsonl_names_the_bad_line(clips, tmp_path):
    path = tmp_path / "qa.jsonl"
    good = {"id": "a", "video": "v0.mp4", "question": "q", "answer": "red"}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "id": "b"}) + "\n")
    task, examples = readers.read_examples(path, videos=clips)
    assert task == "open_qa" and [e.id for e in examples] == ["a", "b"] and examples[0].video == str(clips / "v0.mp4")
    path.write_text(json.dumps(good) + "\n{\"id\": \"b\",\n")
    with pytest.raises(FormatError, match=r"qa\.jsonl line 2: not JSON"):
        readers.read_examples(path)
    path.write_text(json.dumps({"id": "a", "video": "v0.mp4", "question": "q"}) + "\n")
    with pytest.raises(FormatError, match=r"qa\.jsonl line 1: missing answer"):
        readers.read_examples(path)


def test_mvbench_task_files(clips, tmp_path):
    (tmp_path / "action_sequence.json").write_text(json.dumps([
        {"video": "v0.mp4", "question": "What happened?", "candidates": ["x", "y"], "answer": "y",
         "start": 0.2, "end": 0.8},
    ]))
    (tmp_path / "object_shuffle.json").write_text(json.dumps([
        {"video": "v1.avi", "question": "Where?", "candidates": ["a", "b", "c"], "answer": "a"},
    ]))
    task, examples = readers.read_examples(tmp_path, "mvbench", videos=clips)
    assert task == "multiple_choice"
    assert [(e.id, e.category, e.candidates, e.answer, e.start, e.end) for e in examples] == [
        ("action_sequence/0", "action_sequence", ("x", "y"), "y", 0.2, 0.8),
        ("object_shuffle/0", "object_shuffle", ("a", "b", "c"), "a", None, None),
    ]
    (tmp_path / "object_shuffle.json").write_text(json.dumps([
        {"video": "v1.avi", "question": "Where?", "candidates": ["a", "b"], "answer": "c"}]))
    with pytest.raises(FormatError, match=r"object_shuffle\.json entry 0: the answer 'c' is not one of"):
        readers.read_examples(tmp_path, "mvbench", videos=clips)


def test_videomme_parquet(clips, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "video_id": ["001", "001"], "duration": ["short", "short"], "domain": ["Knowledge"] * 2,
        "videoID": ["v0", "v1"], "question_id": ["001-1", "001-2"],
        "question": ["What colour?", "What shape?"],
        "options": [["A. red", "B. blue", "C. green", "D. yellow"], ["A. circle", "B. square", "C. x", "D. y"]],
        "answer": ["A", "B"],
    })
    pq.write_table(table, tmp_path / "test.parquet")
    task, examples = readers.read_examples(tmp_path / "test.parquet", videos=clips)
    assert task == "multiple_choice"
    assert [(e.id, e.answer, e.candidates[0], e.category) for e in examples] == [
        ("001-1", "red", "red", "short"), ("001-2", "square", "circle", "short")]
    assert examples[1].video == str(clips / "v1.avi")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(FormatError, match=r"bad\.parquet: not a readable parquet"):
        readers.read_examples(tmp_path / "bad.parquet")


def test_msrvtt_and_webvid_references(clips, tmp_path):
    info = {
        "videos": [{"video_id": "v0", "split": "test"}, {"video_id": "v1", "split": "train"}],
        "sentences": [{"video_id": "v0", "caption": "a red circle", "sen_id": 0},
                      {"video_id": "v0", "caption": "a red ball moves", "sen_id": 1},
                      {"video_id": "v1", "caption": "a blue square", "sen_id": 2}],
    }
    (tmp_path / "test_videodatainfo.json").write_text(json.dumps(info))
    task, examples = readers.read_examples(tmp_path / "test_videodatainfo.json", "msrvtt", clips, split="test")
    assert task == "caption" and [(e.id, e.references) for e in examples] == [("v0", ("a red circle",
                                                                                      "a red ball moves"))]
    (tmp_path / "coco.json").write_text(json.dumps({"v1": [{"caption": "a blue square"}, "blue box"]}))
    _, examples = readers.read_examples(tmp_path / "coco.json", "msrvtt", clips)
    assert examples[0].references == ("a blue square", "blue box") and examples[0].video == str(clips / "v1.avi")

    (tmp_path / "annotations.csv").write_text("videoid,name,page_dir\nv0,A red circle moves.,.\n")
    task, examples = readers.read_examples(tmp_path / "annotations.csv", videos=clips)
    assert task == "caption" and examples[0].references == ("A red circle moves.",)
    (tmp_path / "annotations.csv").write_text("id,caption\nv0,x\n")
    with pytest.raises(FormatError, match=r"annotations\.csv line 1: the header lacks name, videoid"):
        readers.read_examples(tmp_path / "annotations.csv")
