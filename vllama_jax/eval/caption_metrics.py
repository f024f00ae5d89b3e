"""Captioning scores: BLEU-1..4, ROUGE-L and CIDEr-D by `pycocoevalcap`'s own scorers (the reference
implementation, used as it is), METEOR by its jar when `java` is on PATH.

The captions are tokenised first, as the COCO pipeline does: by Stanford's PTBTokenizer (java) when `java` is
present ("ptb"), else by `python_tokenize` ("python": lower case, words and punctuation split, the punctuation
PTBTokenizer's wrapper drops dropped; contractions are not split as PTB splits them, so scores can differ from
PTB-tokenised ones in such cases). The report names the tokenizer used; SPICE is never run (it downloads
Stanford CoreNLP on first use, and this harness is offline).

Confidence intervals (bootstrap.py): BLEU-n is recomputed on every resample from each clip's cooked n-gram
counts (corpus BLEU is not a mean over clips); ROUGE-L, CIDEr-D and METEOR resample the per-clip scores, CIDEr-D's
document frequencies staying those of the whole set.
"""
from __future__ import annotations

import contextlib
import io
import re
import shutil

import numpy as np

from vllama_jax.eval import bootstrap

# PTBTokenizer's wrapper in pycocoevalcap drops these tokens after tokenising
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
                   ";"}
_TOKEN = re.compile(r"\.\.\.|--|[a-z0-9]+(?:['’][a-z]+)*|[^\sa-z0-9]")


def python_tokenize(text: str) -> str:
    """Lower-cased tokens joined by single spaces, PTB's dropped punctuation removed."""
    return " ".join(t for t in _TOKEN.findall(str(text).replace("\n", " ").lower()) if t not in PTB_PUNCTUATION)


def java_available() -> bool:
    return shutil.which("java") is not None


def choose_tokenizer(name: str = "auto") -> str:
    """"ptb" or "python"; "auto" is ptb when java is on PATH."""
    if name == "auto":
        return "ptb" if java_available() else "python"
    if name not in ("ptb", "python"):
        raise ValueError(f"unknown caption tokenizer {name!r}: expected auto, ptb or python")
    if name == "ptb" and not java_available():
        raise FileNotFoundError("--tokenizer=ptb needs java on PATH (apt-get install default-jre); or use python")
    return name


def tokenize(captions: dict[str, list[str]], tokenizer: str) -> dict[str, list[str]]:
    """{id: [caption, ...]} tokenised by "ptb" (pycocoevalcap's PTBTokenizer) or "python"."""
    if tokenizer == "python":
        return {k: [python_tokenize(c) for c in v] for k, v in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def _bleu_from_cooked(crefs: list, ctest: list) -> list[float]:
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    scorer.crefs, scorer.ctest = crefs, ctest
    with contextlib.redirect_stdout(io.StringIO()):
        return scorer.compute_score(option="closest", verbose=0)[0]


def meteor_scores(gts: dict, res: dict, ids: list[str], scorer=None):
    """(corpus METEOR, per-clip scores, corpus(rows) for a resample) through pycocoevalcap's METEOR process: each
    clip's sufficient statistics are computed once by the jar (its SCORE command) and every resample is one
    EVAL of those statistics, as `Meteor.compute_score` does for the whole set. `scorer`: a running
    `Meteor()` to reuse (each starts a 2 GB JVM)."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = scorer or Meteor()
    with scorer.lock:
        stats = [scorer._stat(res[k][0], gts[k]) for k in ids]

    def evaluate(rows) -> tuple[float, list[float]]:
        with scorer.lock:
            scorer.meteor_p.stdin.write(("EVAL ||| " + " ||| ".join(stats[i] for i in rows) + "\n").encode())
            scorer.meteor_p.stdin.flush()
            per = [float(scorer.meteor_p.stdout.readline().strip()) for _ in rows]
            return float(scorer.meteor_p.stdout.readline().strip()), per

    value, per = evaluate(range(len(ids)))
    return value, per, lambda rows: evaluate(rows)[0]


def score_captions(references: dict[str, list[str]], predictions: dict[str, str], tokenizer: str = "auto",
                   meteor: bool | None = None, resamples: int = bootstrap.RESAMPLES,
                   seed: int = bootstrap.SEED) -> dict:
    """Corpus scores with 95 % intervals: {"tokenizer", "scores": {name: {"value", "ci95"}}, "per_clip": {...}}.

    `references`: {id: [reference, ...]} (at least one each); `predictions`: {id: caption}, the same ids.
    `meteor`: None runs METEOR when java is present."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(references) != set(predictions):
        raise ValueError(f"caption ids differ: {len(set(references) ^ set(predictions))} ids are in only one of "
                         "the references and the predictions")
    empty = sorted(k for k, v in references.items() if not v)
    if empty:
        raise ValueError(f"{len(empty)} clips have no reference caption (first: {empty[0]})")
    tokenizer = choose_tokenizer(tokenizer)
    ids = sorted(references)
    gts = tokenize({k: list(references[k]) for k in ids}, tokenizer)
    res = tokenize({k: [predictions[k]] for k in ids}, tokenizer)

    scorer = BleuScorer(n=4)
    for k in ids:
        scorer += (res[k][0], gts[k])
    crefs, ctest = list(scorer.crefs), list(scorer.ctest)
    bleu = _bleu_from_cooked(crefs, ctest)
    rouge, rouge_per = Rouge().compute_score(gts, res)
    cider, cider_per = Cider().compute_score(gts, res)
    scores, per_clip = {}, {"ROUGE_L": rouge_per, "CIDEr": cider_per}

    def bleu_ci(n: int):
        return bootstrap.statistic_ci(
            lambda rows: _bleu_from_cooked([crefs[i] for i in rows], [ctest[i] for i in rows])[n],
            len(ids), resamples, seed)

    for n in range(4):
        scores[f"Bleu_{n + 1}"] = {"value": float(bleu[n]), "ci95": bleu_ci(n)}
    scores["ROUGE_L"] = {"value": float(rouge), "ci95": bootstrap.mean_ci(rouge_per, resamples, seed)}
    scores["CIDEr"] = {"value": float(cider), "ci95": bootstrap.mean_ci(cider_per, resamples, seed)}
    if meteor or (meteor is None and java_available()):
        value, meteor_per, meteor_corpus = meteor_scores(gts, res, ids)
        scores["METEOR"] = {"value": value, "ci95": bootstrap.statistic_ci(meteor_corpus, len(ids), resamples, seed)}
        per_clip["METEOR"] = meteor_per
    per_clip = {name: dict(zip(ids, np.asarray(v, float).tolist())) for name, v in per_clip.items()}
    return {"tokenizer": tokenizer, "scores": scores, "per_clip": per_clip, "clips": len(ids),
            "not_run": {"SPICE": "needs Stanford CoreNLP downloaded on first use; this harness stays offline"}}
