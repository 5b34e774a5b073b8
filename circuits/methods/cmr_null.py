"""A measured null for the CMR fit: each head's lag-CRP shuffled over lags, fitted the same way.

Ji-An et al. 2024 ("Linking in-context learning in transformers to human episodic memory",
NeurIPS; the CMR fit of attention heads in pre-trained LLMs, reference code ``corxyz/icl-cmr``
``src/fit_attn_score.py``) call a head CMR-like when its CMR distance (the mean squared error of
the best grid point, over the variance of the head's shifted lag-CRP) is below a fixed threshold
(0.5, see :mod:`circuits.methods.cmr_model`). That threshold is not a null: with a 4,620-point grid
and a free shift and scale, a curve of 11 values with no temporal structure can fall below it.
This module complements the criterion with what a head whose attention ignores order would get.

The null chosen: the head's own lag-CRP values over the fitted lags (|lag| <= fit_lag) permuted
at random across those lags, ``n_draws`` times (seeded), each permutation fitted with the same grid
and rule as the head. A permutation keeps everything the distance is invariant to or normalised
by (the set of values, hence their minimum, maximum and variance) and destroys only what CMR is
about: which lag gets which attention (the peak at +1, the forward asymmetry, the decay with
|lag|). The head is CMR-like against the null when its distance is at most that of
few enough permutations: empirical p = (1 + #{null distance <= distance}) / (1 + n_draws)
(Phipson & Smyth 2010, via :func:`interp.stats.against_random`) at most ``alpha``. A head with a
flat lag-CRP has no distance and is never above its null. For a head whose values carry no order
(exchangeable across lags) the observed arrangement is one more draw from the null, so it passes
with probability at most ``alpha``: over H such heads expect about ``alpha * H`` false passes (no
correction for the many heads is applied; the summary states ``alpha`` and the count it implies).

The other reading, the same head on a permuted token sequence, was not taken: the lag is
measured from the current token's first occurrence, so a head that attends to the token after
that occurrence (an induction head, Ji-An et al.'s main CMR-like case) keeps its peak at +1
however the second list is ordered; the lag structure would survive the "null". Shuffling the
fitted curve needs no forward pass: one draw is one more grid fit of every head (tens of milliseconds
for 270 heads on the default grid on a CPU), so 100 draws cost seconds beside minutes of
forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from circuits.methods import cmr_model
from interp.errors import UserError
from interp.stats import against_random

NULL_DRAWS = 100
NULL_ALPHA = 0.05


def permutations(n_heads: int, n_lags: int, n_draws: int, seed: int) -> np.ndarray:
    """Independent uniform permutations of ``n_lags`` positions: ``[n_draws, n_heads, n_lags]``."""
    rng = np.random.default_rng(seed)
    base = np.broadcast_to(np.arange(n_lags), (n_draws, n_heads, n_lags))
    return rng.permuted(base, axis=2)


def null_distances(
    attn: np.ndarray, lags: np.ndarray, grid: cmr_model.CMRGrid, fit_lag: int, perms: np.ndarray
) -> np.ndarray:
    """CMR distance of each head's fitted lag-CRP window permuted by ``perms``: [heads, draws].

    ``perms[d, h]`` permutes head h's values over lags -fit_lag..fit_lag in draw d."""
    attn = np.asarray(attn, dtype=np.float64)
    sel = np.abs(lags) <= fit_lag
    window = attn[:, sel]
    if perms.shape[1:] != window.shape:
        raise UserError(f"null permutations must be [draws, {window.shape[0]}, {window.shape[1]}], got {perms.shape}")
    # One fit per draw keeps the [heads, grid] distance matrix to one draw's size.
    out = np.empty((window.shape[0], perms.shape[0]))
    for d in range(perms.shape[0]):
        shuffled = np.take_along_axis(window, perms[d], axis=1)
        out[:, d] = cmr_model.fit_cmr(shuffled, lags[sel], grid, fit_lag).distance
    return out


@dataclass(frozen=True)
class CMRNull:
    """Each head's distance against its null draws (``null[h]``: that head's null distances)."""

    distance: np.ndarray  # [heads] the head's CMR distance (NaN: flat lag-CRP)
    null: np.ndarray  # [heads, draws]
    p_value: np.ndarray  # [heads] empirical p (NaN where the head has no distance)
    above: np.ndarray  # [heads] bool: p <= alpha
    alpha: float

    @property
    def median(self) -> np.ndarray:
        """Each head's median null distance (NaN for a flat head)."""
        out = np.full(self.null.shape[0], np.nan)
        rows = np.isfinite(self.null).any(axis=1)
        out[rows] = np.nanmedian(self.null[rows], axis=1)
        return out


def against_null(distance: np.ndarray, null: np.ndarray, alpha: float) -> CMRNull:
    """Empirical p of each head's distance among its null distances (lower is better)."""
    if not 0 < alpha < 1:
        raise UserError(f"the null's level must lie in (0, 1), got {alpha}")
    p = np.full(len(distance), np.nan)
    for h, d in enumerate(distance):
        draws = null[h][np.isfinite(null[h])]
        if np.isfinite(d) and draws.size:
            p[h] = against_random(float(d), draws, "lower").p_value
    with np.errstate(invalid="ignore"):
        above = p <= alpha
    return CMRNull(distance=np.asarray(distance, dtype=float), null=null, p_value=p, above=above, alpha=alpha)


def cmr_null(
    attn: np.ndarray, lags: np.ndarray, grid: cmr_model.CMRGrid, fit_lag: int,
    n_draws: int = NULL_DRAWS, seed: int = 0, alpha: float = NULL_ALPHA,
) -> CMRNull:
    """Fit each head and ``n_draws`` lag-shuffles of it; flag the heads above their null."""
    attn = np.asarray(attn, dtype=np.float64)
    distance = cmr_model.fit_cmr(attn, lags, grid, fit_lag).distance
    perms = permutations(attn.shape[0], int((np.abs(lags) <= fit_lag).sum()), n_draws, seed)
    return against_null(distance, null_distances(attn, lags, grid, fit_lag, perms), alpha)
