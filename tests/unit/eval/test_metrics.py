"""The metrics' definitions (vllama_jax/eval/metrics.py, bootstrap.py) on cases computed by hand."""
import numpy as np
import pytest

from vllama_jax.eval import bootstrap, metrics


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("The Cat!", "cat"),
        ("  a   red, circle. ", "red circle"),
        ("An apple-pie", "applepie"),  # SQuAD drops punctuation without a space
        ("theatre", "theatre"),  # articles only as whole words
        ("", ""),
    ],
)
def test_normalize_answer_is_squads(text, normalised):
    assert metrics.normalize_answer(text) == normalised


def test_exact_match_and_containment():
    assert metrics.exact_match("The dog.", "dog")
    assert not metrics.exact_match("a dog runs", "dog")
    assert metrics.contains_answer("a dog runs", "Dog")
    assert not metrics.contains_answer("the dogs run", "dog")  # whole words only
    assert not metrics.contains_answer("anything", "the")  # an answer that normalises to nothing never matches
    assert not metrics.exact_match(None, "dog") and not metrics.contains_answer(None, "dog")


@pytest.mark.parametrize(
    "pred, index",
    [
        ("B", 1),
        ("(B)", 1),
        ("B.", 1),
        ("(B) blue", 1),
        ("B. blue", 1),
        (" c) green ", None),  # lower-case letters are not option letters
        ("blue", 1),
        ("Blue.", 1),
        ("blue circle", None),
        ("A red circle moves", None),  # a sentence starting with "A " names no option
        ("E", None),  # beyond the four options
        ("", None),
        (None, None),
    ],
)
def test_parse_choice(pred, index):
    assert metrics.parse_choice(pred, ["red", "blue", "green", "yellow"]) == index


@pytest.mark.parametrize(
    "reply, parsed",
    [
        ("{'pred': 'yes', 'score': 4}", ("yes", 4.0)),
        ('Sure! {"pred": "no", "score": 1.5} done', ("no", 1.5)),
        ("{'pred': 'yes', 'score': '3'}", ("yes", 3.0)),
        ("{pred: yes, score: 3}", None),
        ("{'pred': 'maybe', 'score': 3}", None),
        ("{'pred': 'yes', 'score': 7}", None),
        ("yes, 5", None),
    ],
)
def test_parse_judge_reply(reply, parsed):
    assert metrics.parse_judge_reply(reply) == parsed


def test_bootstrap_interval_is_fixed_by_its_seed_and_brackets_the_mean():
    x = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 1], float)
    low, high = bootstrap.mean_ci(x)
    assert (low, high) == bootstrap.mean_ci(x)  # same seed, same interval
    assert low < x.mean() < high and 0 <= low and high <= 1
    # by hand: the percentile interval of the resample means
    means = x[np.random.default_rng(0).integers(0, 10, (1000, 10))].mean(axis=1)
    assert (low, high) == (np.percentile(means, 2.5), np.percentile(means, 97.5))
    assert bootstrap.mean_ci(np.ones(5)) == (1.0, 1.0)


def test_grouped_interval_keeps_each_group():
    right = np.array([1, 1, 1, 1, 0, 0], float)
    groups = ["a", "a", "a", "a", "b", "b"]  # task a always right, task b never: every resample's mean is 0.5
    assert bootstrap.grouped_mean_ci(right, groups) == (0.5, 0.5)
