"""The statistics behind a comparison: intervals over test examples and seeds, paired tests, Holm.

Every function takes per-example test scores (1/0 for a label prediction, the metric value
of a generated answer), one row per test example and one column per seed, so a method's
seeds are averaged example by example before anything is resampled: the interval and the
test are over the test set, which is what a reader generalizes to, with the seed-to-seed
spread reported beside them (:func:`seed_interval`).

- :func:`bootstrap_interval`: a 95% BCa bootstrap interval of the mean score
  (``scipy.stats.bootstrap``; percentile where BCa is undefined, e.g. a constant sample).
- :func:`paired_p`: a two-sided paired permutation test (each example's two scores swapped
  at random; ``scipy.stats.permutation_test`` with ``permutation_type="samples"``), the
  approximate-randomization test NLP comparisons use (Dror et al. 2018). It needs no
  normality and handles graded scores, where McNemar's test would need 1/0.
- :func:`holm`: Holm's step-down correction across the methods compared
  (``statsmodels.stats.multitest.multipletests``).
- :func:`anytime_score`: the normalized area under a best-so-far curve.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

CONFIDENCE = 0.95
RESAMPLES = 9999


def per_example(scores) -> np.ndarray:
    """``[n]`` mean over seeds of ``[n, seeds]`` (or ``[n]``) per-example scores."""
    a = np.asarray(scores, dtype=np.float64)
    return a if a.ndim == 1 else a.mean(axis=1)


def bootstrap_interval(scores, confidence: float = CONFIDENCE, n_resamples: int = RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the mean per-example score (seeds averaged first); NaNs for no data."""
    x = per_example(scores)
    if x.size == 0:
        return math.nan, math.nan
    if np.all(x == x[0]):  # every resample has the same mean: the interval is that point
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa's degenerate-jackknife warning: we fall back below
        res = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                              method="BCa", random_state=rng)
        lo, hi = res.confidence_interval
        if not (math.isfinite(lo) and math.isfinite(hi)):
            res = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                                  method="percentile", random_state=rng)
            lo, hi = res.confidence_interval
    return float(lo), float(hi)


def paired_p(a, b, n_resamples: int = RESAMPLES, seed: int = 0) -> float:
    """Two-sided p-value that methods ``a`` and ``b`` (per-example scores on the same test
    examples, in the same order) have the same mean score."""
    x, y = per_example(a), per_example(b)
    if x.shape != y.shape:
        raise ValueError(f"paired scores need the same test examples: {x.shape[0]} vs {y.shape[0]}")
    if x.size == 0 or np.array_equal(x, y):
        return 1.0  # no example tells them apart
    res = stats.permutation_test(
        (x, y), lambda u, v, axis: np.mean(u, axis=axis) - np.mean(v, axis=axis), permutation_type="samples",
        vectorized=True, n_resamples=n_resamples, alternative="two-sided", random_state=np.random.default_rng(seed),
    )
    return float(res.pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values in the input order; NaNs stay NaN and are not counted as tests."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out.tolist()


def seed_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean over seeds (NaNs with fewer than two finite values)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size < 2:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    lo, hi = stats.t.interval(confidence, x.size - 1, loc=x.mean(), scale=stats.sem(x))
    return float(lo), float(hi)


def anytime_score(x: np.ndarray, best: np.ndarray, budget: float) -> float:
    """Normalized area under a best-so-far step curve over ``[0, budget]``.

    The curve is 0 until its first point (a method scores nothing before its first
    evaluation) and holds its last value to ``budget``: a method that finds a good prompt
    early scores higher than one that finds it at the end of its budget, and two methods
    with flat curves score their final value times the share of the budget they had it for.
    Points past ``budget`` are cut off.

    Args:
        x: cost at each point, nondecreasing (example-evaluations, tokens or seconds).
        best: the best score so far at each point.
        budget: the right end of the integral (> 0).
    """
    x, best = np.asarray(x, dtype=np.float64), np.asarray(best, dtype=np.float64)
    if x.size == 0 or not budget > 0:
        return math.nan
    keep = x < budget
    edges = np.r_[x[keep], budget]
    heights = np.nan_to_num(best[keep], nan=0.0)
    return float(np.sum(heights * np.diff(edges)) / budget)
