"""The 95 % intervals of path patching's and circuits' numbers, from their per-pair values.

Every number here is a mean over the same prompt pairs, so each interval resamples or
differences *pairs* (one clean prompt, its corrupt prompt, and every run of that pair):

- an edge's (or sender block's) effect, mean over pairs of m(patched) - m(clean), is a plain
  mean of per-pair differences: Student's paired t interval on them (``paired-t``);
- m(clean), m(corrupt) and a circuit run's m(C) are plain means: t intervals (``t``); the gap
  m(clean) - m(corrupt) is the paired t interval of the two;
- faithfulness (m(C) - m(corrupt)) / (m(clean) - m(corrupt)) is a ratio of means, for which no
  t interval holds: a bootstrap over pairs, each resample drawing whole pairs so that a pair's
  three values move together (``paired-bca-bootstrap``; percentile where BCa is undefined;
  Efron & Tibshirani 1993, ch. 14).

The computations are :mod:`interp.stats`'s; this module only says which applies to what.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from interp.stats import Interval, mean_interval, paired_bootstrap_interval, paired_t_interval
from interp.stats.bootstrap import DEFAULT_RESAMPLES

LEVEL = 0.95


def _array(x: torch.Tensor | Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=float)


def effect_interval(patched: torch.Tensor | Any, clean: torch.Tensor | Any, level: float = LEVEL) -> Interval:
    """mean over pairs of (patched - clean) with its paired t interval; n = the pairs."""
    return paired_t_interval(_array(patched), _array(clean), level)


def gap_intervals(clean: torch.Tensor | Any, corrupt: torch.Tensor | Any, level: float = LEVEL) -> dict[str, Interval]:
    """``clean_metric``, ``corrupt_metric`` (t) and ``gap`` = clean - corrupt (paired t), per pair values."""
    c, k = _array(clean), _array(corrupt)
    return {"clean_metric": mean_interval(c, level), "corrupt_metric": mean_interval(k, level),
            "gap": paired_t_interval(c, k, level)}


def _ratio_of_means(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) / np.mean(y, axis=axis)


def faithfulness_interval(circuit: torch.Tensor | Any, clean: torch.Tensor | Any, corrupt: torch.Tensor | Any, *,
                          level: float = LEVEL, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """(mean m(C) - mean m(corrupt)) / (mean m(clean) - mean m(corrupt)) with its bootstrap
    interval over pairs.

    Pair i enters as (m(C)_i - m(corrupt)_i, m(clean)_i - m(corrupt)_i); the statistic is the
    ratio of the two means, which is the faithfulness; resampling index i keeps the pair's
    three runs together (a paired bootstrap, ``seed``-ed).
    """
    c, f, e = _array(circuit), _array(clean), _array(corrupt)
    return paired_bootstrap_interval(c - e, f - e, _ratio_of_means, level, n_resamples, seed)


__all__ = ["LEVEL", "effect_interval", "faithfulness_interval", "gap_intervals"]
