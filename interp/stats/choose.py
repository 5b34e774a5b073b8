"""The entry points: an interval for one condition's values, or for the paired difference of two
conditions on the same items, with the method picked from the data unless named.

The rule for ``method="auto"``:

- a ``statistic`` other than the mean is given: the BCa bootstrap (``bootstrap``), the only
  method here for an arbitrary statistic;
- every value is 0 or 1 (accuracies, hits): Wilson for one condition, Newcombe's method 10 for a
  paired difference (both small-sample methods; Brown, Cai & DasGupta 2001; Fagerland, Lydersen &
  Laake 2014);
- otherwise: Student's t interval of the mean, or of the mean paired difference.

Data that are 0/1 only by accident (a continuous score that happens to be 0 or 1 everywhere) are
taken as outcomes: name ``method="t"`` for them.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from interp.errors import UserError
from interp.stats.binary import wilson
from interp.stats.bootstrap import DEFAULT_RESAMPLES, Statistic, bootstrap_interval, paired_bootstrap_interval
from interp.stats.checks import ArrayLike, as_pairs, as_values, is_binary
from interp.stats.interval import Interval
from interp.stats.means import mean_interval, paired_t_interval
from interp.stats.paired_binary import newcombe_paired

Method = Literal["auto", "wilson", "t", "bootstrap"]
PairedMethod = Literal["auto", "newcombe", "paired-t", "paired-bootstrap"]


def _check_method(method: str, allowed: tuple[str, ...], statistic: Statistic | None) -> None:
    if method not in allowed:
        raise UserError(f"unknown interval method {method!r}; choose from {', '.join(allowed)}")
    if statistic is not None and method not in ("auto", "bootstrap", "paired-bootstrap"):
        raise UserError(f"method {method!r} is for means; a statistic needs the bootstrap")


def interval(values: ArrayLike, *, level: float = 0.95, method: Method = "auto",
             statistic: Statistic | None = None, n_resamples: int = DEFAULT_RESAMPLES,
             seed: int = 0) -> Interval:
    """The mean (or ``statistic``) of ``values`` with its ``level`` confidence interval.

    ``method="auto"`` picks as the module docstring says; the bootstrap uses ``n_resamples``
    resamples drawn with ``seed``.
    """
    _check_method(method, get_args(Method), statistic)
    x = as_values(values)
    if method == "auto":
        method = "bootstrap" if statistic is not None else ("wilson" if is_binary(x) else "t")
    if method == "wilson":
        return wilson(x, level)
    if method == "t":
        return mean_interval(x, level)
    return bootstrap_interval(x, statistic if statistic is not None else np.mean, level, n_resamples, seed)


def paired_interval(a: ArrayLike, b: ArrayLike, *, level: float = 0.95, method: PairedMethod = "auto",
                    statistic: Statistic | None = None, n_resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0) -> Interval:
    """mean(a) - mean(b) (or ``statistic(a, b)``) over the same items under two conditions.

    ``a[i]`` and ``b[i]`` are item i's values; ``method="auto"`` picks as the module docstring
    says (Newcombe only where both conditions are 0/1).
    """
    _check_method(method, get_args(PairedMethod), statistic)
    x, y = as_pairs(a, b)
    if method == "auto":
        binary = is_binary(x) and is_binary(y)
        method = "paired-bootstrap" if statistic is not None else ("newcombe" if binary else "paired-t")
    if method == "newcombe":
        return newcombe_paired(x, y, level)
    if method == "paired-t":
        return paired_t_interval(x, y, level)
    if statistic is None:
        return paired_bootstrap_interval(x, y, level=level, n_resamples=n_resamples, seed=seed)
    return paired_bootstrap_interval(x, y, statistic, level, n_resamples, seed)
