"""The per-example metrics of open-ended QA, multiple choice and the judge's replies, defined exactly.

- Open QA, exact match: `normalize_answer(pred) == normalize_answer(answer)`, SQuAD's normalisation (lower
  case; punctuation removed; the articles a / an / the removed; whitespace collapsed).
- Open QA, containment (reported separately, labelled as such): the normalised answer appears in the normalised
  prediction as whole words (" red " in " a red circle ", not in " reddish ").
- Multiple choice: the prediction names an option by letter (`B`, `(B)`, `B.`, `B)`, `(B) text`, `B. text`) or
  is exactly one option's text (whitespace and case aside, a final full stop ignored); anything else is wrong and
  counted as unparsed. A letter beyond the options is unparsed too.
- Judge replies (Video-ChatGPT's protocol): a Python/JSON dict with 'pred' yes/no and 'score' 0-5; a reply
  without both is unparsed, kept out of accuracy = yes / (yes + no) and counted.
"""
from __future__ import annotations

import ast
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
LETTERS = string.ascii_uppercase


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(pred: str | None, answer: str) -> bool:
    return pred is not None and normalize_answer(pred) == normalize_answer(answer)


def contains_answer(pred: str | None, answer: str) -> bool:
    """The normalised answer occurs in the normalised prediction as whole words (an empty answer never does)."""
    want = normalize_answer(answer)
    return pred is not None and bool(want) and f" {want} " in f" {normalize_answer(pred)} "


# a letter alone, "(B)" with or without text after it, "B." / "B)" / "B:" with or without text after it
_LETTER = re.compile(r"^\s*(?:\(([A-Z])\)(?:\s.*)?|([A-Z])(?:[.):](?:\s.*)?)?)\s*$", re.S)


def _option_text(text: str) -> str:
    return " ".join(str(text).split()).rstrip(".").casefold()


def parse_choice(pred: str | None, candidates: list[str]) -> int | None:
    """The option `pred` names (index into `candidates`), or None when it names none (unparsed)."""
    if pred is None:
        return None
    match = _LETTER.match(pred)
    if match:
        index = LETTERS.index(match.group(1) or match.group(2))
        return index if index < len(candidates) else None
    said = _option_text(pred)
    same = [i for i, c in enumerate(candidates) if _option_text(c) == said]
    return same[0] if len(same) == 1 else None


def parse_judge_reply(reply: str) -> tuple[str, float] | None:
    """('yes' | 'no', score) from the judge's reply, or None. The first {...} in the reply is read as a Python
    literal (the protocol asks for a Python dict string), else as 'pred'/'score' key-value pairs."""
    found = re.search(r"\{.*?\}", reply, re.S)
    if not found:
        return None
    try:
        value = ast.literal_eval(found.group(0))
    except (ValueError, SyntaxError):
        pred = re.search(r"['\"]pred['\"]\s*:\s*['\"](yes|no)['\"]", found.group(0), re.I)
        score = re.search(r"['\"]score['\"]\s*:\s*['\"]?([0-9.]+)", found.group(0))
        value = {"pred": pred.group(1), "score": score.group(1)} if pred and score else None
    if not isinstance(value, dict):
        return None
    pred, score = str(value.get("pred", "")).strip().lower(), value.get("score")
    try:
        score = float(score)
    except (TypeError, ValueError):
        return None
    if pred not in ("yes", "no") or not 0 <= score <= 5:
        return None
    return pred, score
