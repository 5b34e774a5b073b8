"""Measured nulls for the CMR fit: what a head whose attention ignores order gets from the same fit.

Ji-An et al. 2024 ("Linking in-context learning in transformers to human episodic memory",
NeurIPS; the CMR fit of attention heads in pre-trained LLMs, reference code ``corxyz/icl-cmr``
``src/fit_attn_score.py``) call a head CMR-like when its CMR distance (the mean squared error of
the best grid point over the variance of the head's shifted lag-CRP) is below a fixed threshold
(0.5, :mod:`circuits.methods.cmr_model`). The threshold is not a null: with a 4,620-point grid
and a free shift and scale, a curve of 11 values can fall below it without any temporal
contiguity around the match. This module complements that criterion with a sampled null, fitted
with the same grid and rule: a head is CMR-like against its null when its empirical p =
(1 + #{null distance <= distance}) / (1 + n_draws) (Phipson & Smyth 2010, through
:func:`interp.stats.against_random`) is at most ``alpha``. A head with a flat lag-CRP has no
distance and is never above its null. The heads are tested one by one (no correction for their
number): over H heads with no order, expect about ``alpha * H`` passes by chance.

Two nulls (``kind``):

- ``match`` (default, the faithful one): the same head, the same forward passes, but each
  second-list query's match replaced by a random first-list position (draw d: a random bijection
  of the list positions, :func:`circuits.detectors.lag_crp.match_null_from_pattern`), so the
  lag-CRP is read around a position unrelated to where the query's token was studied. This is
  "attention that ignores order" relative to the match while keeping everything else the head
  does (its attention mass on the first list, its serial-position and recency profile): a head
  whose attention does not depend on the query gets its own lag-CRP back from every draw (p = 1).
  It does not tell the match from its neighbours: a head that attends to the matching token
  itself (a spike at lag 0, which the grid fits) passes too. It is computed in the same forward
  passes (a gather per draw) and stored per unit as one artifact of draws x layers x heads x lags
  values (20 draws on smollm2-135m: 92k per unit; the store grows from about 5 to 8 MB).
- ``lags``: the head's own lag-CRP values over the fitted lags (|lag| <= fit_lag) permuted at
  random across those lags. No forward pass (one more grid fit per draw), and it keeps the
  values the distance is normalised by; but a lag-CRP that is one spike has only 11 places to
  put it and the grid fits a spike at lag 0 as exactly as one at +1, so such a head's p cannot
  fall below about 2/11 however sharp the spike: on smollm2-135m it leaves the sharpest induction
  heads (L17H3-5, L18H6, L18H7, L24H4, distance < 1e-3) below their null (p 0.16 to 0.20 with 100
  draws), which the ``match`` null passes (p = 1/21 with 20 draws).

Running the head on a permuted token sequence instead was not taken: the lag is measured from
the current token's first occurrence, so a head that attends to the token after that occurrence
(an induction head, Ji-An et al.'s main CMR-like case) keeps its peak at +1 however the lists are
ordered, and the "null" would keep the mechanism.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from circuits.methods import cmr_model
from interp.errors import UserError
from interp.stats import against_random

NULL_DRAWS = 20
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
        # A draw equal to the head's distance up to rounding (a null lag-CRP equal to the head's,
        # summed in another order) is a tie, and a tie counts against the head.
        draws = np.where(np.isclose(draws, d, rtol=1e-9, atol=1e-12), d, draws)
        if np.isfinite(d) and draws.size:
            p[h] = against_random(float(d), draws, "lower").p_value
    with np.errstate(invalid="ignore"):
        above = p <= alpha
    return CMRNull(distance=np.asarray(distance, dtype=float), null=null, p_value=p, above=above, alpha=alpha)


def fit_null_curves(null_crp: np.ndarray, lags: np.ndarray, grid: cmr_model.CMRGrid, fit_lag: int) -> np.ndarray:
    """CMR distance of every null lag-CRP ``null_crp`` [heads, draws, lags]: [heads, draws]."""
    n_heads, n_draws, _ = null_crp.shape
    out = np.empty((n_heads, n_draws))
    for d in range(n_draws):
        out[:, d] = cmr_model.fit_cmr(null_crp[:, d], lags, grid, fit_lag).distance
    return out


def cmr_null(
    attn: np.ndarray, lags: np.ndarray, grid: cmr_model.CMRGrid, fit_lag: int,
    n_draws: int = NULL_DRAWS, seed: int = 0, alpha: float = NULL_ALPHA, distance: np.ndarray | None = None,
) -> CMRNull:
    """Fit each head (unless its ``distance`` is given, from the same fit) and ``n_draws``
    lag-shuffles of it (the ``lags`` null); flag the heads above it."""
    attn = np.asarray(attn, dtype=np.float64)
    if distance is None:
        distance = cmr_model.fit_cmr(attn, lags, grid, fit_lag).distance
    perms = permutations(attn.shape[0], int((np.abs(lags) <= fit_lag).sum()), n_draws, seed)
    return against_null(distance, null_distances(attn, lags, grid, fit_lag, perms), alpha)
