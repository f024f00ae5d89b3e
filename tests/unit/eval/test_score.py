"""Scoring predictions files (vllama_jax/eval/score.py, caption_metrics.py) with planted predictions whose metrics
are known by hand; the caption scores against pycocoevalcap's scorers called directly (exact equality)."""
import json
import math

import numpy as np
import pytest

from vllama_jax.eval import caption_metrics, score
from vllama_jax.eval.readers import FormatError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


OPEN_QA = [
    {"question_id": "1", "question": "what runs?", "answer": "dog", "pred": "The dog.", "category": "what"},
    {"question_id": "2", "question": "what runs?", "answer": "dog", "pred": "a dog runs", "category": "what"},
    {"question_id": "3", "question": "who sits?", "answer": "dog", "pred": "cat", "category": "who"},
    {"question_id": "4", "question": "who sits?", "answer": "man", "pred": None, "error": "v4.mp4: no such file",
     "category": "who"},
]


def test_open_qa_by_hand(tmp_path):
    rows = score.read_predictions(write_jsonl(tmp_path / "p.jsonl", OPEN_QA), "open_qa")
    result = score.score_open_qa(rows)
    metrics = result["metrics"]
    assert metrics["exact_match"]["value"] == 0.25  # only "The dog." normalises to "dog"
    contains = next(v for k, v in metrics.items() if k.startswith("contains_answer"))
    assert contains["value"] == 0.5  # "The dog." and "a dog runs"; the missing video counts as wrong
    assert result["per_category"] == {
        "what": {"examples": 2, "exact_match": 0.5, "contains_answer": 1.0},
        "who": {"examples": 2, "exact_match": 0.0, "contains_answer": 0.0},
    }
    assert result["missing_video"] == {"count": 1, "ids": ["4"]}
    low, high = metrics["exact_match"]["ci95"]
    assert 0 <= low <= 0.25 <= high <= 1


MULTIPLE_CHOICE = [
    {"question_id": "a/0", "question": "q", "candidates": ["red", "blue"], "answer": "blue", "pred": "B",
     "category": "a"},
    {"question_id": "a/1", "question": "q", "candidates": ["red", "blue"], "answer": "blue", "pred": "(A) red",
     "category": "a"},
    {"question_id": "a/2", "question": "q", "candidates": ["red", "blue"], "answer": "blue", "pred": "Blue",
     "category": "a"},
    {"question_id": "a/3", "question": "q", "candidates": ["red", "blue"], "answer": "blue",
     "pred": "I think it is blue", "category": "a"},
    {"question_id": "b/0", "question": "q", "candidates": ["x", "y", "z", "w"], "answer": "C", "pred": "C.",
     "category": "b"},
    {"question_id": "b/1", "question": "q", "candidates": ["x", "y", "z", "w"], "answer": "z", "pred": None,
     "error": "missing", "category": "b"},
]


def test_multiple_choice_by_hand(tmp_path):
    rows = score.read_predictions(write_jsonl(tmp_path / "p.jsonl", MULTIPLE_CHOICE), "multiple_choice")
    result = score.score_multiple_choice(rows)
    assert result["metrics"]["accuracy"]["value"] == 0.5  # a/0, a/2 and b/0 of six
    assert result["per_category"] == {"a": {"examples": 4, "accuracy": 0.5}, "b": {"examples": 2, "accuracy": 0.5}}
    assert result["metrics"]["mean_over_tasks"]["value"] == 0.5
    assert result["unparsed"] == {"count": 1, "ids": ["a/3"]}  # the missing video is counted apart
    assert result["missing_video"]["count"] == 1
    assert result["chance"] == pytest.approx((4 * 0.5 + 2 * 0.25) / 6)
    assert result["predicted_options"] == {"A": 1, "B": 2, "C": 1, "unparsed": 2}


def test_caption_scores_by_hand_and_equal_to_pycocoevalcap(tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    one = score.score_captions([{"id": "v", "references": ["A red circle moves left."], "pred": "a red circle moves"}],
                               tokenizer="python", meteor=False)
    # by hand: 4 of 4 unigrams match, brevity penalty exp(1 - 5/4); LCS 4: P 1, R 0.8, F(beta 1.2)
    assert one["metrics"]["Bleu_1"]["value"] == pytest.approx(math.exp(-0.25), abs=1e-8)
    assert one["metrics"]["ROUGE_L"]["value"] == pytest.approx(2.44 * 0.8 / (0.8 + 1.44), abs=1e-12)
    assert one["tokenizer"] == "python"

    rows = [
        {"id": "v1", "references": ["A red circle moves left.", "a red ball rolls"], "pred": "A red circle moves."},
        {"id": "v2", "references": ["The dog runs on the beach", "a dog running"], "pred": "a cat runs"},
        {"id": "v3", "references": ["two men talk", "men are talking in a room"], "pred": "a man talks in a room"},
    ]
    rows = score.read_predictions(write_jsonl(tmp_path / "c.jsonl", rows), "caption")
    result = score.score_captions(rows, tokenizer="python", meteor=False)
    gts = {r["id"]: [caption_metrics.python_tokenize(c) for c in r["references"]] for r in rows}
    res = {r["id"]: [caption_metrics.python_tokenize(r["pred"])] for r in rows}
    assert gts["v1"][0] == "a red circle moves left" and res["v1"] == ["a red circle moves"]
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert [result["metrics"][f"Bleu_{n}"]["value"] for n in range(1, 5)] == bleu
    assert result["metrics"]["ROUGE_L"]["value"] == Rouge().compute_score(gts, res)[0]
    assert result["metrics"]["CIDEr"]["value"] == Cider().compute_score(gts, res)[0]
    for value in result["metrics"].values():
        assert value["ci95"][0] <= value["value"] + 1e-9 or np.isnan(value["ci95"][0])


@pytest.mark.skipif(not caption_metrics.java_available(), reason="java is not installed")
def test_caption_scores_with_java_equal_pycocoevalcaps_pipeline():
    """With java: the PTB tokenizer, then CIDEr-D and METEOR (the jar's corpus score) as pycocoevalcap's own
    classes compute them."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {"v1": ["A man's dog runs.", "a dog running"], "v2": ["Two men talk", "men are talking"]}
    preds = {"v1": "a man's dog runs", "v2": "two men are talking"}
    result = caption_metrics.score_captions(refs, preds, tokenizer="ptb", meteor=False, resamples=3)
    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": preds[k]}] for k in refs})
    assert result["tokenizer"] == "ptb" and gts["v1"][0] == "a man 's dog runs"
    assert result["scores"]["CIDEr"]["value"] == Cider().compute_score(gts, res)[0]
    # METEOR: one JVM (a 2 GB heap and its paraphrase table) serves the reference call and ours
    jar = Meteor()
    want, want_per = jar.compute_score(gts, res)
    value, per, corpus = caption_metrics.meteor_scores(gts, res, sorted(refs), jar)
    assert (value, per) == (want, want_per) and corpus([0, 1]) == want


def test_bad_predictions_files_name_the_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(OPEN_QA[0]) + "\n{not json\n")
    with pytest.raises(FormatError, match=r"p\.jsonl line 2: not JSON"):
        score.read_predictions(path, "open_qa")
    path.write_text(json.dumps({"question_id": "1", "pred": "x"}) + "\n")
    with pytest.raises(FormatError, match=r"line 1: missing question, answer"):
        score.read_predictions(path, "open_qa")
    write_jsonl(path, [OPEN_QA[0], OPEN_QA[0]])
    with pytest.raises(FormatError, match=r"line 2: question_id '1' appears twice"):
        score.read_predictions(path, "open_qa")
    with pytest.raises(ValueError, match="caption ids differ"):
        caption_metrics.score_captions({"a": ["x"]}, {"b": "x"}, tokenizer="python")
