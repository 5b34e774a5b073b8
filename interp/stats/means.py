"""Means of continuous values with Student's t interval, and the paired t test.

Student (1908), "The probable error of a mean", Biometrika 6: mean ± t(1 - α/2, n - 1) s / sqrt(n)
covers the true mean with probability 1 - α for normal data, and close to it for other data once
n is moderate (the central limit theorem); the paired version is the same on the per-item
differences of two conditions.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from interp.errors import UserError
from interp.stats.checks import ArrayLike, as_pairs, as_values, check_level
from interp.stats.interval import Interval


def t_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and t confidence interval as (mean, lo, hi); lo = hi = nan for fewer than 2 values."""
    level = check_level(level)
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def paired_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of the paired t test of mean(a - b) = 0; nan without spread or pairs."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise UserError(f"paired values need one value per item in each condition, got {len(a)} and {len(b)}")
    d = a - b
    if len(d) < 2 or np.allclose(d, d[0]):
        return float("nan")  # no spread of the differences: the t statistic is undefined
    return float(stats.ttest_rel(a, b).pvalue)


def mean_interval(values: ArrayLike, level: float = 0.95) -> Interval:
    """The mean of continuous values with its t interval (method "t")."""
    m, lo, hi = t_interval(as_values(values), level)
    return Interval(m, lo, hi, len(np.asarray(values)), "t", check_level(level))


def paired_t_interval(a: ArrayLike, b: ArrayLike, level: float = 0.95) -> Interval:
    """mean(a - b) over items measured under both conditions, with the paired t interval."""
    x, y = as_pairs(a, b)
    m, lo, hi = t_interval(x - y, level)
    return Interval(m, lo, hi, len(x), "paired-t", check_level(level))
