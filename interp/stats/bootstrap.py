"""Any statistic with a bootstrap interval: BCa, falling back to percentile where BCa is undefined.

Efron (1987), "Better bootstrap confidence intervals", JASA 82: the bias-corrected and accelerated
(BCa) interval corrects the percentile interval for the bootstrap distribution's median bias and
for the skew of the statistic's standard error (the acceleration, from the jackknife); Efron &
Tibshirani (1993), "An Introduction to the Bootstrap", ch. 14 (BCa) and on the number of
resamples; DiCiccio & Efron (1996), "Bootstrap confidence intervals", Statistical Science 11.
The work is done by ``scipy.stats.bootstrap`` with a seeded generator. BCa is undefined where
every resample gives the same value or the jackknife has no spread (all values equal); there the
percentile interval is used and named in ``Interval.method``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats

from interp.stats.checks import ArrayLike, as_pairs, as_values, check_level, check_resamples
from interp.stats.interval import Interval

# 9,999 resamples, scipy's default, puts the Monte Carlo error of a 95 % BCa bound well below the
# sampling error for the n of this project's data sets (Efron & Tibshirani 1993).
DEFAULT_RESAMPLES = 9_999

Statistic = Callable[..., Any]


def mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """mean(x - y) along ``axis``: the default statistic of a paired bootstrap."""
    return np.mean(x - y, axis=axis)


def _bounds(data: tuple[np.ndarray, ...], statistic: Statistic, paired: bool, level: float,
            n_resamples: int, seed: int) -> tuple[float, float, str]:
    """(lo, hi, "bca" or "percentile"): BCa where it gives finite bounds, else percentile."""
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            # BCa's undefined cases warn and return nan; the nan is what we test for below.
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            res = stats.bootstrap(data, statistic, n_resamples=n_resamples, confidence_level=level,
                                  method=method, paired=paired, rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return lo, hi, method.lower()
    return math.nan, math.nan, "percentile"


def bootstrap_interval(values: ArrayLike, statistic: Statistic = np.mean, level: float = 0.95,
                       n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """``statistic(values)`` with its BCa bootstrap interval (method "bca-bootstrap").

    ``statistic`` maps a 1-D array to a number; given an ``axis`` keyword (np.mean, np.median)
    all resamples are evaluated in one call. All values equal: the interval value..value (method
    "percentile-bootstrap"); fewer than 2 values: lo = hi = nan.
    """
    x, level, n_resamples = as_values(values), check_level(level), check_resamples(n_resamples)
    value = float(statistic(x))
    if len(x) < 2:
        return Interval(value, math.nan, math.nan, len(x), "bca-bootstrap", level)
    if np.all(x == x[0]):
        return Interval(value, value, value, len(x), "percentile-bootstrap", level)
    lo, hi, kind = _bounds((x,), statistic, False, level, n_resamples, seed)
    return Interval(value, lo, hi, len(x), f"{kind}-bootstrap", level)


def paired_bootstrap_interval(a: ArrayLike, b: ArrayLike, statistic: Statistic = mean_difference,
                              level: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES,
                              seed: int = 0) -> Interval:
    """``statistic(a, b)`` over items measured under both conditions, resampling whole items.

    The default statistic is mean(a - b). Method "paired-bca-bootstrap", or
    "paired-percentile-bootstrap" where BCa is undefined (every item the same pair: value..value).
    """
    x, y = as_pairs(a, b)
    level, n_resamples = check_level(level), check_resamples(n_resamples)
    value = float(statistic(x, y))
    if len(x) < 2:
        return Interval(value, math.nan, math.nan, len(x), "paired-bca-bootstrap", level)
    if np.all(x == x[0]) and np.all(y == y[0]):
        return Interval(value, value, value, len(x), "paired-percentile-bootstrap", level)
    lo, hi, kind = _bounds((x, y), statistic, True, level, n_resamples, seed)
    return Interval(value, lo, hi, len(x), f"paired-{kind}-bootstrap", level)
