"""Two sets of heads against two random sets of the same sizes: how many heads they share.

Drawing ``b`` of ``n`` heads at random, the number that fall in a fixed set of ``a`` is
hypergeometric, so the chance distribution of the shared count, and of the Jaccard index
shared / (a + b - shared), is exact: no random draws are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class OverlapVsChance:
    """``shared`` heads of two sets of ``a`` and ``b`` among ``n``: the observed Jaccard index,
    its mean and 2.5th / 97.5th percentiles under chance, and the one-sided p-values of sharing at
    least (``p_more``) or at most (``p_fewer``) as many heads by chance."""

    a: int
    b: int
    shared: int
    n: int
    jaccard: float
    chance_mean: float
    chance_lo: float
    chance_hi: float
    p_more: float
    p_fewer: float


def overlap_vs_chance(a: int, b: int, shared: int, n: int) -> OverlapVsChance:
    if not 0 <= shared <= min(a, b) or max(a, b) > n or a + b - shared < 1:
        raise ValueError(f"cannot share {shared} heads between sets of {a} and {b} of {n}")
    support = np.arange(max(0, a + b - n), min(a, b) + 1)
    pmf = stats.hypergeom.pmf(support, n, a, b)
    jacc = support / (a + b - support)
    lo_k, hi_k = (int(stats.hypergeom.ppf(q, n, a, b)) for q in (0.025, 0.975))
    return OverlapVsChance(
        a=a, b=b, shared=shared, n=n, jaccard=shared / (a + b - shared), chance_mean=float(np.sum(pmf * jacc)),
        chance_lo=lo_k / (a + b - lo_k), chance_hi=hi_k / (a + b - hi_k),
        p_more=float(stats.hypergeom.sf(shared - 1, n, a, b)), p_fewer=float(stats.hypergeom.cdf(shared, n, a, b)),
    )
