"""The evaluation loop (vllama_jax/eval/run.py, model_calls.py) in this process on 8 simulated devices: the tiny
Video-LLaMA with random weights and the test tokenizer, on real mp4 files in the released formats. What the
answers say is noise here; the wiring is checked: every id once in input order, missing and broken videos marked
and counted, the option log-likelihoods equal to a direct recomputation, windows read from the right frames.
(The trained model's answers are checked in tests/e2e/test_main_job.py.)"""
import json

import numpy as np
import pytest

from vllama_jax.eval import model_calls, readers, score
from vllama_jax.eval.run import Evaluation, RunSettings


@pytest.fixture(scope="module")
def session(tmp_path_factory, tokenizer, tiny_config):
    from vllama_jax.infer.session import load_session

    path = tmp_path_factory.mktemp("eval_session") / "tokenizer"
    tokenizer.save_pretrained(path)
    config = tiny_config.copy_and_resolve_references()
    config.data.tokenizer = str(path)
    return load_session(config, None, log=lambda *_: None)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from vllama_jax.data.synthetic import write_shape_video

    folder = tmp_path_factory.mktemp("eval_clips")
    rng = np.random.default_rng(0)
    for i, colour in enumerate(("red", "blue", "green")):
        write_shape_video(folder / f"v{i}.mp4", colour, "circle", "from left to right", rng, size=32, num_frames=16)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    return folder


def test_open_qa_run_marks_missing_and_broken_videos_and_keeps_input_order(session, clips, tmp_path):
    names = ["v0", "gone", "v1", "broken", "v2", "v0", "v1", "v2", "v0"]  # 9 examples: a batch of 8 and a filled one
    (tmp_path / "test_q.json").write_text(json.dumps(
        [{"video_name": n, "question_id": f"q{i}", "question": "what colour is it?"} for i, n in enumerate(names)]))
    (tmp_path / "test_a.json").write_text(json.dumps(
        [{"answer": "red", "type": "colour", "question_id": f"q{i}"} for i in range(len(names))]))
    task, examples = readers.read_examples(tmp_path, videos=clips)
    settings = RunSettings(task=task, template="vicuna", batch_size=8, max_new_tokens=4)
    out = tmp_path / "out"
    out.mkdir()
    summary = Evaluation(session, settings).run(examples, out, log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows == summary["rows"] and [r["question_id"] for r in rows] == [f"q{i}" for i in range(9)]
    assert "gone.mp4: video not found" in rows[1]["error"] and rows[1]["pred"] is None
    assert "broken.mp4: cannot read the video" in rows[3]["error"]
    assert all(isinstance(r["pred"], str) for i, r in enumerate(rows) if i not in (1, 3))
    result = score.score_open_qa(rows)
    assert result["examples"] == 9 and result["missing_video"] == {"count": 2, "ids": ["q1", "q3"]}
    # rerun: nothing left to do, the file unchanged
    before = (out / "predictions.jsonl").read_bytes()
    again = Evaluation(session, settings).run(examples, out, log=lambda *_: None)
    assert again["answered_now"] == 0 and (out / "predictions.jsonl").read_bytes() == before
    # a kill in the middle of an append: the cut line is dropped and its example answered again
    (out / "predictions.jsonl").write_bytes(before[: before.rfind(b"\n", 0, len(before) - 1) + 12])
    again = Evaluation(session, settings).run(examples, out, log=lambda *_: None)
    assert again["answered_now"] == 1 and (out / "predictions.jsonl").read_bytes() == before


def test_option_loglikelihoods_equal_a_direct_recomputation(session, clips):
    import jax

    from vllama_jax.models.llama import LlamaForCausalLM

    examples = [readers.Example(f"m{i}", str(clips / f"v{i % 3}.mp4"), "what colour?", "red",
                                ("red", "blue", "green", "yellow")[: 3 + i % 2]) for i in range(8)]
    items = [model_calls.read_media(ex, session) for ex in examples]
    prompt = [model_calls.prompt_ids(session, "caption", "", item) for item in items]
    options = [[session.tokenizer(c, add_special_tokens=False)["input_ids"] for c in ex.candidates] for ex in examples]
    got = model_calls.option_loglikelihoods(session, items, prompt, options, 4, 64)
    assert got.shape == (8, 4) and np.isneginf(got[0, 3]) and np.isfinite(got[1]).all()
    llm = LlamaForCausalLM(session.model.config.llm)
    forward = jax.jit(lambda params, embeds: llm.apply({"params": params}, inputs_embeds=embeds))
    row = 1  # four options; reference: the prompt's embeddings (session.prompt_embeddings, unpadded), each
    # option's token embeddings after them, one forward pass, log-softmax summed over the option's tokens
    ids = np.asarray([prompt[row]], np.int32)
    prompt_embeds, _ = session.prompt_embeddings(ids, np.ones_like(ids, bool), items[row].frames[None])
    for k, tokens in enumerate(options[row]):
        option_embeds = llm.apply({"params": session.params["llama_model"]}, np.asarray([tokens]),
                                  method=LlamaForCausalLM.embed)
        logits = forward(session.params["llama_model"], np.concatenate([prompt_embeds, option_embeds], axis=1))
        logp = np.asarray(jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1))
        want = sum(logp[len(prompt[row]) + j - 1, t] for j, t in enumerate(tokens))
        # tolerance: left padding, the batch's layout on 8 devices and float32 sums
        assert abs(got[row, k] - want) < 1e-4, (k, got[row, k], want)


def test_a_window_reads_frames_from_within_it(session, clips):
    whole = model_calls.read_media(readers.Example("a", str(clips / "v0.mp4")), session)
    late = model_calls.read_media(readers.Example("b", str(clips / "v0.mp4"), start=1.0, end=1.9), session)
    assert whole.seconds[0] == 0.0 and late.seconds[0] >= 1.0 and late.seconds[-1] <= 1.9 + 1e-6
    assert late.frames.shape == whole.frames.shape


def test_multiple_choice_and_caption_runs_write_scorable_files(session, clips, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "videoID": ["v0", "v1"], "duration": ["short", "medium"], "question_id": ["1", "2"],
        "question": ["What colour?", "What colour?"],
        "options": [["A. red", "B. blue", "C. green", "D. yellow"]] * 2, "answer": ["A", "B"],
    }), tmp_path / "videomme.parquet")
    task, examples = readers.read_examples(tmp_path / "videomme.parquet", videos=clips)
    for likelihood in (False, True):
        out = tmp_path / f"mc{likelihood}"
        out.mkdir()
        settings = RunSettings(task=task, template="caption", likelihood=likelihood, batch_size=8, max_new_tokens=4)
        rows = Evaluation(session, settings).run(examples, out, log=lambda *_: None)["rows"]
        result = score.score_multiple_choice(score.read_predictions(out / "predictions.jsonl", task))
        assert [r["question_id"] for r in rows] == ["1", "2"] and set(result["per_category"]) == {"short", "medium"}
        if likelihood:  # always one of the options, by its letter and text
            assert result["unparsed"]["count"] == 0 and rows[0]["pred"][:4] in ("(A) ", "(B) ", "(C) ", "(D) ")

    (tmp_path / "refs.json").write_text(json.dumps({"v0": ["a red circle"], "v2": ["a green circle", "green"]}))
    task, examples = readers.read_examples(tmp_path / "refs.json", "msrvtt", clips)
    out = tmp_path / "cap"
    out.mkdir()
    Evaluation(session, RunSettings(task=task, template="caption", batch_size=8, max_new_tokens=4)).run(
        examples, out, log=lambda *_: None)
    rows = score.read_predictions(out / "predictions.jsonl", "caption")
    assert [r["id"] for r in rows] == ["v0", "v2"] and rows[1]["references"] == ["a green circle", "green"]
    assert score.score_captions(rows, tokenizer="python", meteor=False)["metrics"]["CIDEr"]["value"] >= 0
