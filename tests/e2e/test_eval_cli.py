"""`vllama-eval score` as a user runs it: another system's predictions file scored, and a malformed file refused
with its name and line. (Judge mode: tests/unit/eval/test_judge.py.)"""
import json
import subprocess

from vllama_jax.testing.jobs import environment


def _score(repo_root, *args):
    return subprocess.run(["vllama-eval", "score", *args], cwd=repo_root, env=environment(), capture_output=True,
                          text=True, timeout=600)


def test_score_command_scores_another_systems_file(repo_root, tmp_path):
    rows = [{"question_id": "1", "question": "what runs?", "answer": "dog", "pred": "The dog."},
            {"question_id": "2", "question": "what runs?", "answer": "dog", "pred": "a dog runs"},
            {"question_id": "3", "question": "who sits?", "answer": "cat", "pred": "a man"}]
    predictions = tmp_path / "theirs.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "metrics.json"
    result = _score(repo_root, "--task=open_qa", f"--predictions={predictions}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"task": "open_qa", "exact_match": 1 / 3}
    metrics = json.loads(out.read_text())
    assert metrics["results"]["metrics"]["exact_match"]["value"] == 1 / 3
    assert metrics["predictions_digest"] and metrics["bootstrap"] == {"resamples": 1000, "seed": 0}
    assert metrics["versions"]["pycocoevalcap"] == "1.2"


def test_score_command_names_the_bad_line(repo_root, tmp_path):
    predictions = tmp_path / "broken.jsonl"
    predictions.write_text('{"id": "v1", "references": ["a dog"], "pred": "a dog"}\n{"id": "v2", "pred": "x"}\n')
    result = _score(repo_root, "--task=caption", f"--predictions={predictions}", f"--out={tmp_path / 'm.json'}")
    assert result.returncode != 0 and "broken.jsonl line 2: missing references" in result.stderr
