"""The mean of 0/1 outcomes (an accuracy, a hit rate) with its Wilson score interval.

Wilson (1927), "Probable inference, the law of succession, and statistical inference", JASA 22:
the interval inverts the score test, whose standard error uses the hypothesised p rather than its
estimate. Brown, Cai & DasGupta (2001), "Interval estimation for a binomial proportion",
Statistical Science 16 (§2, §4), show the Wald interval p ± z sqrt(p(1-p)/n) undercovers badly
at small n or p near 0 or 1 (and has zero width at 0 or n successes), and recommend Wilson (or
Jeffreys) for n <= 40.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from interp.errors import UserError
from interp.stats.checks import ArrayLike, as_binary, check_level
from interp.stats.interval import Interval


def normal_quantile(level: float) -> float:
    """z such that a standard normal lies in [-z, z] with probability ``level``."""
    return float(stats.norm.ppf(0.5 + level / 2))


def wilson_bounds(successes: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson's bounds for arrays of success counts out of n (n >= 1), elementwise.

    centre (x + z²/2) / (n + z²), half-width z sqrt(x (n - x) / n + z²/4) / (n + z²).
    """
    x, m = np.asarray(successes, dtype=float), np.asarray(n, dtype=float)
    z2 = z * z
    centre = (x + z2 / 2) / (m + z2)
    half = z * np.sqrt(x * (m - x) / m + z2 / 4) / (m + z2)
    # The bounds lie in [0, 1] exactly; the clip only removes rounding at 0 or n successes.
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def wilson_counts(successes: int, n: int, level: float = 0.95) -> Interval:
    """The Wilson score interval of ``successes`` out of ``n`` trials."""
    level = check_level(level)
    if n < 1 or not 0 <= successes <= n:
        raise UserError(f"Wilson interval needs 0 <= successes <= n and n >= 1, got {successes} of {n}")
    lo, hi = wilson_bounds(np.array(successes), np.array(n), normal_quantile(level))
    return Interval(successes / n, float(lo), float(hi), int(n), "wilson", level)


def wilson(values: ArrayLike, level: float = 0.95) -> Interval:
    """The mean of 0/1 outcomes with its Wilson score interval."""
    arr = as_binary(values)
    return wilson_counts(int(arr.sum()), len(arr), level)
