"""Checks of the statistics' input: bad input raises ``UserError`` with a one-line message."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from interp.errors import UserError

# Beyond this the bootstrap costs minutes and buys nothing: the Monte Carlo error of a 95 %
# bound is already far below the sampling error of any data set (Efron & Tibshirani 1993).
MAX_RESAMPLES = 1_000_000

ArrayLike = np.ndarray | Sequence[float] | Sequence[int] | Sequence[bool]


def check_level(level: float) -> float:
    """The confidence level as a float strictly between 0 and 1."""
    if isinstance(level, bool) or not isinstance(level, int | float | np.floating | np.integer):
        raise UserError(f"confidence level must be a number in (0, 1), got {level!r}")
    level = float(level)
    if not 0.0 < level < 1.0:
        raise UserError(f"confidence level must be in (0, 1), got {level}")
    return level


def check_resamples(n_resamples: int) -> int:
    """The number of bootstrap resamples, 1 to ``MAX_RESAMPLES``."""
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int | np.integer):
        raise UserError(f"n_resamples must be an integer, got {n_resamples!r}")
    if not 1 <= n_resamples <= MAX_RESAMPLES:
        raise UserError(f"n_resamples must be between 1 and {MAX_RESAMPLES:,}, got {n_resamples}")
    return int(n_resamples)


def as_values(values: ArrayLike, name: str = "values") -> np.ndarray:
    """A non-empty one-dimensional float array of finite numbers."""
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name} must be numbers: {exc}") from None
    if arr.ndim != 1:
        raise UserError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise UserError(f"{name} is empty: no interval from no data")
    if not np.isfinite(arr).all():
        raise UserError(f"{name} has {int((~np.isfinite(arr)).sum())} non-finite value(s) (nan or inf)")
    return arr


def is_binary(arr: np.ndarray) -> bool:
    """Whether every value is 0 or 1."""
    return bool(np.isin(arr, (0.0, 1.0)).all())


def as_binary(values: ArrayLike, name: str = "values") -> np.ndarray:
    """A non-empty one-dimensional array of 0/1 outcomes (booleans accepted) as floats."""
    arr = as_values(values, name)
    if not is_binary(arr):
        bad = arr[~np.isin(arr, (0.0, 1.0))][0]
        raise UserError(f"{name} must be 0/1 outcomes for a binary method, found {bad:g}")
    return arr


def as_pairs(a: ArrayLike, b: ArrayLike, binary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Two arrays of one length: the same items under two conditions."""
    check = as_binary if binary else as_values
    x, y = check(a, "first condition's values"), check(b, "second condition's values")
    if len(x) != len(y):
        raise UserError(f"paired values need one value per item in each condition, got {len(x)} and {len(y)}")
    return x, y

