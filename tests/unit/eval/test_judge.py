"""Judge mode (vllama_jax/eval/judge.py): a tiny random Hugging Face Llama saved here is read through the
project's converter, gives transformers' logits on the protocol's prompt, and judges a predictions file; its
verdicts are appended as they come and a rerun judges only what is left."""
import json

import numpy as np
import pytest

from vllama_jax.eval import judge, metrics, score

ROWS = [
    {"question_id": "1", "question": "what colour is it?", "answer": "red", "pred": "red"},
    {"question_id": "2", "question": "what colour is it?", "answer": "blue", "pred": "green"},
    {"question_id": "3", "question": "what moves?", "answer": "dog", "pred": None, "error": "v3.mp4: video not found"},
]


@pytest.fixture(scope="module")
def hf_judge(tmp_path_factory, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf_judge") / "tiny-judge"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def test_the_judge_is_read_through_the_converter_and_matches_transformers(hf_judge):
    import torch

    path, reference = hf_judge
    llm, params, tokenizer = judge.load_judge(path)
    ids = judge.judge_prompt(tokenizer, ROWS[1])
    assert tokenizer.decode(ids).count("Correct Answer: blue") == 1 and ids[0] == tokenizer.bos_token_id
    ours = np.asarray(llm.apply({"params": params}, np.asarray([ids], np.int32)))
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits.numpy()
    # reference: transformers' LlamaForCausalLM in float32 on the same weights; tolerance for fp32 sums
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_judge_rows_appends_verdicts_and_resumes(hf_judge, tmp_path):
    path, _ = hf_judge
    out = tmp_path / "judge.jsonl"
    judged, info = judge.judge_rows(str(path), ROWS, out, max_new_tokens=6, log=lambda *_: None)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in records] == ["1", "2"]  # the example without a video is not asked
    assert [r["judge"] for r in judged[:2]] == [r["judge"] for r in records]
    assert metrics.parse_judge_reply(judged[2]["judge"]) == ("no", 0.0)  # scored as a wrong answer
    assert info["name"] == "tiny-judge" and len(info["digest"]) == 64 and info["decoding"] == "greedy"
    again, _ = judge.judge_rows(str(path), ROWS, out, max_new_tokens=6, log=lambda *_: None)
    assert out.read_text().count("\n") == 2 and again == judged
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        judge.llama_config({"model_type": "mistral"}, "x/config.json")


def test_judged_scores_by_hand():
    replies = ["{'pred': 'yes', 'score': 5}", "{'pred': 'no', 'score': 1}", "{'pred': 'yes', 'score': 3}",
               "I cannot judge this."]
    rows = [{**ROWS[0], "question_id": str(i), "judge": r} for i, r in enumerate(replies)]
    result = score.score_open_qa(rows)["judge"]
    assert result["accuracy (yes / (yes + no))"]["value"] == pytest.approx(2 / 3)
    assert result["score (mean, 0-5)"]["value"] == pytest.approx(3.0)
    assert result["judged"] == 4 and result["unparsed_replies"] == 1
