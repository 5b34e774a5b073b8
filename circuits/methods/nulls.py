"""Per-head tests of a score against its null: is a head's score above what the same head gets
where the mechanism cannot act?

Each head has one value per item (prompt, needle sample) under the real condition and one under
its null on the same item (the same prompt's twin without repeats, the same decoding with the
needle's tokens permuted). The rule: a head is above its null when the lower end of the paired t
interval of mean(score - null) (Student 1908; :func:`interp.stats.paired_t_interval`) lies
above 0. The interval's level is Bonferroni-adjusted over the heads tested at once (Dunn 1961,
JASA 56): with ``level`` 0.95 and H heads each interval has level 1 - 0.05 / H, so that the
chance that any head with no mechanism is called above its null is at most 0.025 (the lower,
one-sided end only). Fewer than two items, or an undefined interval, is never above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from interp.errors import UserError
from interp.stats import Interval, paired_t_interval
from interp.stats.checks import check_level

RULE = "paired t interval of mean(score - null) over items, Bonferroni over heads, lower end > 0"


@dataclass(frozen=True)
class NullTest:
    """Every head's paired comparison: ``intervals[i]`` of head ``i`` (flattened layer-major) and
    whether it is above its null; ``level`` is each interval's (adjusted) level."""

    intervals: list[Interval]
    above: np.ndarray
    level: float

    @property
    def n_above(self) -> int:
        return int(self.above.sum())

    @property
    def share_above(self) -> float:
        return float(self.above.mean()) if len(self.above) else 0.0


def adjusted_level(level: float, n_heads: int) -> float:
    """The per-head level that keeps the family-wise level ``level`` over ``n_heads`` heads."""
    level = check_level(level)
    if n_heads < 1:
        raise UserError(f"need at least one head to test against its null, got {n_heads}")
    return 1.0 - (1.0 - level) / n_heads


def above_null(scores: np.ndarray, nulls: np.ndarray, level: float = 0.95) -> NullTest:
    """Heads above their null by the module's rule.

    ``scores`` and ``nulls`` are [items, heads] (or [items, layers, heads], flattened layer-major):
    item i's value of each head under the real condition and under the null.
    """
    a, b = np.asarray(scores, dtype=float), np.asarray(nulls, dtype=float)
    if a.shape != b.shape:
        raise UserError(f"scores and nulls need the same shape, got {a.shape} and {b.shape}")
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    lvl = adjusted_level(level, a.shape[1])
    intervals = [paired_t_interval(a[:, j], b[:, j], lvl) for j in range(a.shape[1])]
    above = np.array([iv.defined and iv.lo > 0 for iv in intervals], dtype=bool)
    return NullTest(intervals, above, lvl)


def stack_items(items: Sequence[np.ndarray]) -> np.ndarray:
    """Per-item [..., layers, heads] arrays (a batch each, or one item each) as one
    [items, layers, heads] array, in the given order."""
    if not items:
        raise UserError("no items to test against the null")
    arrays = [np.asarray(x, dtype=float) for x in items]
    return np.concatenate([x.reshape(-1, *x.shape[-2:]) for x in arrays], axis=0)
