"""Scoring a predictions file, ours or another system's, so that numbers can be compared across code bases.

Fields per task (one JSON object a line):
- open_qa: {question_id, question, answer, pred} (+ optional category)
- multiple_choice: {question_id, question, candidates, answer, pred} (+ optional category); the answer is the
  right option's text or its letter
- caption: {id, references: [...], pred} (+ optional category)

A line with an "error" (its video could not be read) counts as a wrong answer and is reported; it is never
left out of the denominator. Every metric comes with its 95 % bootstrap interval (bootstrap.py).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from vllama_jax.eval import bootstrap, caption_metrics, metrics
from vllama_jax.eval.readers import TASKS, FormatError

ID_FIELD = {"open_qa": "question_id", "multiple_choice": "question_id", "caption": "id"}
FIELDS = {
    "open_qa": ("question_id", "question", "answer", "pred"),
    "multiple_choice": ("question_id", "question", "candidates", "answer", "pred"),
    "caption": ("id", "references", "pred"),
}


def read_predictions(path: str | Path, task: str) -> list[dict]:
    """The predictions file's rows, checked: JSON per line, the task's fields, each id once."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    path, rows, seen = Path(path), [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise FormatError(f"{where}: not JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(row, dict):
            raise FormatError(f"{where}: expected a JSON object")
        missing = [k for k in FIELDS[task] if k not in row and not (k == "pred" and "error" in row)]
        if missing:
            raise FormatError(f"{where}: missing {', '.join(missing)} for a {task} prediction")
        key = str(row[ID_FIELD[task]])
        if key in seen:
            raise FormatError(f"{where}: {ID_FIELD[task]} {key!r} appears twice")
        seen.add(key)
        rows.append(row)
    if not rows:
        raise FormatError(f"{path}: no predictions")
    return rows


def _metric(per_example, resamples: int, seed: int) -> dict:
    x = np.asarray(per_example, np.float64)
    return {"value": float(x.mean()) if x.size else float("nan"), "ci95": bootstrap.mean_ci(x, resamples, seed)}


def _per_category(rows: list[dict], values: dict[str, np.ndarray]) -> dict:
    cats = np.array([str(r.get("category", "")) for r in rows])
    out = {}
    for cat in sorted(set(cats.tolist())):
        pick = cats == cat
        out[cat or "all"] = {"examples": int(pick.sum()), **{k: float(v[pick].mean()) for k, v in values.items()}}
    return out


def _errors(rows: list[dict], id_field: str) -> dict:
    failed = [r for r in rows if r.get("error")]
    return {"count": len(failed), "ids": [str(r[id_field]) for r in failed][:50]}


def score_open_qa(rows: list[dict], resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED) -> dict:
    exact = np.array([metrics.exact_match(r.get("pred"), r["answer"]) for r in rows], float)
    contains = np.array([metrics.contains_answer(r.get("pred"), r["answer"]) for r in rows], float)
    result = {
        "task": "open_qa",
        "examples": len(rows),
        "metrics": {
            "exact_match": _metric(exact, resamples, seed),
            "contains_answer (normalised answer found in the normalised prediction; not exact match)":
                _metric(contains, resamples, seed),
        },
        "per_category": _per_category(rows, {"exact_match": exact, "contains_answer": contains}),
        "missing_video": _errors(rows, "question_id"),
    }
    judged = [r for r in rows if "judge" in r]
    if judged:
        result["judge"] = score_judged(judged, resamples, seed)
    return result


def score_judged(rows: list[dict], resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED) -> dict:
    """Video-ChatGPT's judge numbers: accuracy = yes / (yes + no) and the mean score, over parsed replies."""
    parsed = [metrics.parse_judge_reply(r["judge"]) for r in rows]
    ok = [p for p in parsed if p is not None]
    yes = np.array([p[0] == "yes" for p in ok], float)
    return {
        "accuracy (yes / (yes + no))": _metric(yes, resamples, seed),
        "score (mean, 0-5)": _metric([p[1] for p in ok], resamples, seed),
        "judged": len(rows),
        "unparsed_replies": len(rows) - len(ok),
    }


def _answer_index(row: dict, where: str) -> int:
    candidates, answer = [str(c) for c in row["candidates"]], str(row["answer"]).strip()
    if answer in candidates:
        return candidates.index(answer)
    if len(answer) == 1 and answer in metrics.LETTERS[: len(candidates)]:
        return metrics.LETTERS.index(answer)
    raise FormatError(f"{where}: answer {row['answer']!r} is neither an option's text nor its letter")


def score_multiple_choice(rows: list[dict], resamples: int = bootstrap.RESAMPLES,
                          seed: int = bootstrap.SEED) -> dict:
    chosen = [metrics.parse_choice(r.get("pred"), [str(c) for c in r["candidates"]]) for r in rows]
    truth = [_answer_index(r, f"question_id {r['question_id']!r}") for r in rows]
    right = np.array([c == t for c, t in zip(chosen, truth)], float)
    tasks = [str(r.get("category", "")) for r in rows]
    per_task = _per_category(rows, {"accuracy": right})
    mean_over_tasks = float(np.mean([v["accuracy"] for v in per_task.values()]))
    unparsed = [r for r, c in zip(rows, chosen) if c is None and not r.get("error")]
    return {
        "task": "multiple_choice",
        "examples": len(rows),
        "metrics": {
            "accuracy": _metric(right, resamples, seed),
            "mean_over_tasks": {"value": mean_over_tasks,
                                "ci95": bootstrap.grouped_mean_ci(right, tasks, resamples, seed)},
        },
        "unparsed": {"count": len(unparsed), "ids": [str(r["question_id"]) for r in unparsed][:50]},
        "per_category": per_task,
        "chance": float(np.mean([1 / len(r["candidates"]) for r in rows])),
        "predicted_options": dict(sorted(Counter(metrics.LETTERS[c] if c is not None else "unparsed"
                                                 for c in chosen).items())),
        "missing_video": _errors(rows, "question_id"),
    }


def score_captions(rows: list[dict], tokenizer: str = "auto", meteor: bool | None = None,
                   resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED) -> dict:
    refs = {str(r["id"]): [str(c) for c in r["references"]] for r in rows}
    preds = {str(r["id"]): str(r.get("pred") or "") for r in rows}  # a clip that failed scores as empty
    scored = caption_metrics.score_captions(refs, preds, tokenizer, meteor, resamples, seed)
    cats = {str(r["id"]): str(r.get("category", "")) for r in rows}
    per_category = {}
    for cat in sorted(set(cats.values())):
        ids = [k for k, c in cats.items() if c == cat]
        per_category[cat or "all"] = {"examples": len(ids), **{
            name: float(np.mean([values[k] for k in ids])) for name, values in scored["per_clip"].items()}}
    return {
        "task": "caption",
        "examples": len(rows),
        "tokenizer": scored["tokenizer"],
        "metrics": scored["scores"],
        "per_category": per_category,
        "not_run": scored["not_run"],
        "missing_video": _errors(rows, "id"),
    }


def score_rows(task: str, rows: list[dict], tokenizer: str = "auto", meteor: bool | None = None,
               resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED) -> dict:
    if task == "open_qa":
        return score_open_qa(rows, resamples, seed)
    if task == "multiple_choice":
        return score_multiple_choice(rows, resamples, seed)
    if task == "caption":
        return score_captions(rows, tokenizer, meteor, resamples, seed)
    raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")


def headline(result: dict) -> tuple[str, float]:
    """The one number a progress bar and the chart lead with."""
    name = {"open_qa": "exact_match", "multiple_choice": "accuracy", "caption": "CIDEr"}[result["task"]]
    return name, result["metrics"][name]["value"]
