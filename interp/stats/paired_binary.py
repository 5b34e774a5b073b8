"""Two conditions on the same items with 0/1 outcomes (accuracy with and without pruning): the
difference of the two proportions with Newcombe's interval, and McNemar's exact test.

Newcombe (1998), "Improved confidence intervals for the difference between binomial proportions
based on paired data", Statistics in Medicine 17, method 10: square-and-add the two Wilson
intervals' arms, less twice their correlation phi (corrected towards 0 by n/2 where ad > bc).
Fagerland, Lydersen & Laake (2014), "Recommended tests and confidence intervals for paired binomial
proportions", Statistics in Medicine 33, find its coverage close to nominal at small n, where the
Wald interval undercovers. McNemar (1947), Psychometrika 12: only the discordant pairs carry
information on the difference; the exact version tests b ~ Binomial(b + c, 1/2). Fagerland et al.
(2013, BMC Medical Research Methodology 13:91) note that exact version is conservative.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from interp.stats.binary import normal_quantile, wilson_bounds
from interp.stats.checks import ArrayLike, as_pairs, check_level
from interp.stats.interval import Interval


def paired_table(a: ArrayLike, b: ArrayLike) -> tuple[int, int, int, int]:
    """Counts (n11, n10, n01, n00): 1 in both, 1 only in ``a``, 1 only in ``b``, 0 in both."""
    x, y = as_pairs(a, b, binary=True)
    x1, y1 = x == 1, y == 1
    return (int((x1 & y1).sum()), int((x1 & ~y1).sum()), int((~x1 & y1).sum()), int((~x1 & ~y1).sum()))


def _phi(n11: int, n10: int, n01: int, n00: int) -> float:
    """Newcombe's corrected correlation of the two proportions (0 where a margin is empty)."""
    n = n11 + n10 + n01 + n00
    margins = (n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00)
    if margins == 0:
        return 0.0
    cross = n11 * n00 - n10 * n01
    if cross > n / 2:
        cross = cross - n / 2
    elif cross >= 0:
        cross = 0
    return cross / math.sqrt(margins)


def newcombe_paired(a: ArrayLike, b: ArrayLike, level: float = 0.95) -> Interval:
    """mean(a) - mean(b) for 0/1 outcomes on the same items, with Newcombe's method-10 interval."""
    level = check_level(level)
    n11, n10, n01, n00 = paired_table(a, b)
    n = n11 + n10 + n01 + n00
    p1, p2 = (n11 + n10) / n, (n11 + n01) / n
    (l1, l2), (u1, u2) = wilson_bounds(np.array([n11 + n10, n11 + n01]), np.array([n, n]), normal_quantile(level))
    phi = _phi(n11, n10, n01, n00)
    down = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    up = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    d = p1 - p2
    return Interval(d, max(d - down, -1.0), min(d + up, 1.0), n, "newcombe", level)


def mcnemar_exact_p(a: ArrayLike, b: ArrayLike) -> float:
    """Two-sided exact McNemar p-value: min(1, 2 P(X <= min(n10, n01))), X ~ Binomial(n10 + n01, 1/2).

    1.0 where no pair is discordant (no evidence of a difference).
    """
    _, n10, n01, _ = paired_table(a, b)
    if n10 + n01 == 0:
        return 1.0
    return float(min(1.0, 2 * stats.binom.cdf(min(n10, n01), n10 + n01, 0.5)))
