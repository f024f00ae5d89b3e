"""95 % bootstrap confidence intervals with a fixed seed, so that two runs (or two systems) on the same examples
get the same resamples and can be compared honestly.

Percentile intervals: the statistic on `resamples` resamples of the examples drawn with replacement, the 2.5th
and 97.5th percentiles of those values. The resample indices depend only on (number of examples, resamples,
seed): every metric of one report uses the same resamples.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) indices into n examples, drawn with replacement."""
    if n == 0:
        return np.zeros((resamples, 0), int)
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap statistics."""
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(np.asarray(values, np.float64), [tail, 100 - tail])
    return float(low), float(high)


def mean_ci(per_example, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """The interval of the mean of per-example values (accuracies as 0/1, scores)."""
    x = np.asarray(per_example, np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    return interval(x[resample_indices(len(x), resamples, seed)].mean(axis=1))


def statistic_ci(statistic: Callable[[np.ndarray], float], n: int, resamples: int = RESAMPLES,
                 seed: int = SEED) -> tuple[float, float]:
    """The interval of any corpus statistic, called with each resample's example indices (e.g. corpus BLEU)."""
    if n == 0:
        return float("nan"), float("nan")
    return interval(np.array([statistic(rows) for rows in resample_indices(n, resamples, seed)]))


def grouped_mean_ci(per_example, groups, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """The interval of the mean over groups of each group's mean (e.g. the mean over MVBench tasks): examples
    are resampled within their group, so every resample keeps each group's size."""
    x, groups = np.asarray(per_example, np.float64), np.asarray(groups)
    names = sorted(set(groups.tolist()))
    if not names:
        return float("nan"), float("nan")
    per_group = []
    for i, name in enumerate(names):
        values = x[groups == name]
        per_group.append(values[resample_indices(len(values), resamples, seed + i)].mean(axis=1))
    return interval(np.mean(per_group, axis=0))
