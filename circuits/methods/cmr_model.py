"""The context maintenance and retrieval model (CMR) and the CMR fit of attention lag-CRPs.

Ji-An et al. 2024 (ref code ``corxyz/icl-cmr``, ``src/est_cmr_crp.py`` and
``src/fit_attn_score.py``):

- Study: n one-hot items presented once, a chain transition matrix T (T[i, i+1] = 1) with an
  absorbing state appended, and M = (I - (1 - beta_enc) T)^-1 T (context-to-item), M_FT = M.
- Recall: f proportional to M^T t; sample an item (stop at the absorbing state);
  t_IN = (1 - gamma_FT) f + gamma_FT M_FT f, normalised; t <- (1 - beta_rec) t + beta_rec t_IN,
  normalised. The first transition is measured from the start position s0.
- CRP: per simulated trial, counts of lags in [-8, 8] over that trial's number of transitions;
  mean over trials; normalised to sum 1; then averaged over start positions s0 = 0..19. The two
  cells with a closed form in the reference (beta_rec = 1, gamma = 0 and beta_rec = 0,
  gamma = 0) use the reference's closed forms.
- Grid: beta_enc 20 values in (0, 1], beta_rec 21 in [0, 1], gamma_FT 11 in [0, 1].

The reference simulates 1000 trials per start position and grid point in a Python loop. Here
every trial of every grid point is a row of one batched tensor, stepped together (finished
trials are dropped from the batch), so the whole grid takes seconds; ``n_sims`` (trials per
start position) trades time for Monte-Carlo noise. The reference averages ``all_crps`` over
``axis=2`` before saving, which is the gamma axis of its 5-d array while its fitting code indexes
the saved file as (beta_enc, beta_rec, gamma, lag); we average over start positions, which is
what the fitting code's indexing implies.

The simulated grid is the same for every model: it is cached on disk under
``cache_root()/cmr/`` keyed by a hash of every simulation parameter.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interp.errors import UserError

CMR_LIKE = 0.5
CMR_LIKE_STRICT = 0.1
FIT_LAG = 5


def _grid(n: int, low_inclusive: bool) -> tuple[float, ...]:
    vals = np.arange(0 if low_inclusive else 1, n + 1) / n
    return tuple(float(round(v, 10)) for v in vals)


@dataclass(frozen=True)
class GridSpec:
    """Everything the simulated grid depends on (its cache key is a hash of these fields)."""

    beta_enc: tuple[float, ...] = field(default_factory=lambda: _grid(20, low_inclusive=False))
    beta_rec: tuple[float, ...] = field(default_factory=lambda: _grid(20, low_inclusive=True))
    gamma_ft: tuple[float, ...] = field(default_factory=lambda: _grid(10, low_inclusive=True))
    n_items: int = 100
    max_lag: int = 8
    n_starts: int = 20
    max_samples: int = 100
    # Defaults measured here (2 beta_enc slices against 50 sampled trials per start): "expected"
    # with 1 trial per start is within 0.014 (max abs) of the CRP, like "sampled" with 10.
    n_sims: int = 1
    seed: int = 0
    closed_forms: bool = True
    estimator: str = "expected"
    version: int = 1

    def __post_init__(self) -> None:
        if not self.beta_enc or not self.beta_rec or not self.gamma_ft:
            raise UserError("CMR grid: every parameter axis needs at least one value")
        if min(self.beta_enc) <= 0 or max(self.beta_enc) > 1:
            raise UserError("CMR grid: beta_enc values must lie in (0, 1]")
        for name in ("beta_rec", "gamma_ft"):
            vals = getattr(self, name)
            if min(vals) < 0 or max(vals) > 1:
                raise UserError(f"CMR grid: {name} values must lie in [0, 1]")
        if self.n_sims < 1 or self.n_items < 2 or self.max_lag < 1 or self.max_samples < 1:
            raise UserError("CMR grid: n_sims, max_lag and max_samples must be >= 1 and n_items >= 2")
        if self.estimator not in ("sampled", "expected"):
            raise UserError(f"CMR grid: estimator must be 'sampled' or 'expected', got {self.estimator!r}")
        if not 1 <= self.n_starts <= self.n_items:
            raise UserError(f"CMR grid: n_starts must be in 1..{self.n_items}")

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def lags(self) -> np.ndarray:
        return np.arange(-self.max_lag, self.max_lag + 1)


@dataclass
class CMRGrid:
    """CRP of every grid point: ``crp[i_enc, i_rec, i_gamma, lag]`` over lags -max_lag..max_lag,
    each row normalised to sum 1."""

    spec: GridSpec
    crp: np.ndarray
    seconds: float
    cached: bool = False

    def params_of(self, flat_index: int) -> tuple[float, float, float]:
        i, j, k = np.unravel_index(flat_index, self.crp.shape[:3])
        return self.spec.beta_enc[i], self.spec.beta_rec[j], self.spec.gamma_ft[k]


def encode(beta_enc: float, n_items: int) -> np.ndarray:
    """M = (I - (1 - beta_enc) T)^-1 T for a chain of n items plus an absorbing state."""
    size = n_items + 1
    t = np.eye(size, k=1)
    return np.linalg.inv(np.eye(size) - (1.0 - beta_enc) * t) @ t


def closed_form_crp(m: np.ndarray, s0: int, beta_rec: float, n_items: int, max_lag: int) -> np.ndarray:
    """The reference's closed forms (``getCRP``) for beta_rec in {0, 1} with gamma_FT = 0."""
    crp = np.zeros(2 * max_lag + 1)
    if beta_rec == 1:
        power = np.eye(m.shape[0])
        row_sums = m.sum(axis=1)
        for d in range(1, max_lag + 1):
            power = power @ m
            p1 = power[s0] / power[s0].sum()
            with np.errstate(divide="ignore", invalid="ignore"):
                p2 = np.append(np.diagonal(m, offset=d), np.zeros(d)) / row_sums
            crp[d + max_lag] = np.nansum(p1 * p2)
    elif beta_rec == 0:
        p1 = m[s0] / m[s0].sum()
        crp[max_lag] = np.square(p1).sum()
        for d in range(1, min(n_items, max_lag + 1)):
            crp[max_lag + d] = (p1[:-d] * p1[d:]).sum()
            crp[max_lag - d] = (p1[d:] * p1[:-d]).sum()
    else:
        raise ValueError("closed form only for beta_rec in {0, 1}")
    return crp / crp.sum()


@dataclass
class _Trials:
    """The recall trials still running, one row each, with their state; a trial leaves the batch
    when it recalls the absorbing state (see :func:`simulate_counts`)."""

    alive: torch.Tensor  # [rows] index of each trial in the caller's rows
    t: torch.Tensor  # [rows, size] context
    f: torch.Tensor  # [rows, size] feature drive M^T t
    prev: torch.Tensor  # [rows] the item recalled last (the start position at first)
    br: torch.Tensor  # [rows, 1] beta_rec
    gm: torch.Tensor  # [rows, 1] gamma_FT
    counts: torch.Tensor  # [rows, 2*max_lag+1] lag counts (or summed lag probabilities)
    n_trans: torch.Tensor  # [rows] transitions so far

    def select(self, rows: torch.Tensor) -> _Trials:
        return _Trials(*(getattr(self, f.name)[rows] for f in fields(self)))

    def retire(self, mask: torch.Tensor, out_counts: torch.Tensor, out_trans: torch.Tensor) -> None:
        """Write the counts of the trials in ``mask`` to their rows of the outputs."""
        out_counts[self.alive[mask]] = self.counts[mask].double()
        out_trans[self.alive[mask]] = self.n_trans[mask].double()


def _start_trials(
    mm: torch.Tensor, beta_rec: torch.Tensor, gamma: torch.Tensor, s0: torch.Tensor, max_lag: int
) -> _Trials:
    """Every trial at its start position: context e_s0, feature drive M^T e_s0, no transitions."""
    dtype = mm.dtype
    rows = s0.shape[0]
    t = torch.zeros(rows, mm.shape[0], dtype=dtype)
    t[torch.arange(rows), s0] = 1.0
    return _Trials(
        alive=torch.arange(rows),
        t=t,
        f=mm[s0].clone(),  # M^T e_s0
        prev=s0.clone(),
        br=beta_rec.to(dtype)[:, None],
        gm=gamma.to(dtype)[:, None],
        counts=torch.zeros(rows, 2 * max_lag + 1, dtype=dtype),
        n_trans=torch.zeros(rows, dtype=dtype),
    )


def _sample_items(f: torch.Tensor, gen: torch.Generator, absorbing: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One recalled item per trial, with probability proportional to its feature drive (one
    uniform draw per trial), and each trial's total drive [rows, 1]."""
    cum = torch.cumsum(f, dim=1)
    total = cum[:, -1:]
    u = torch.rand(f.shape[0], 1, generator=gen, dtype=f.dtype) * total
    return torch.searchsorted(cum, u).squeeze(1).clamp_(max=absorbing), total


def _lag_probabilities(trials: _Trials, total: torch.Tensor, lag_offsets: torch.Tensor, absorbing: int) -> torch.Tensor:
    """The conditional distribution of the next transition's lag [rows, lags]: the sampling
    probabilities of the items around the previous one, given that recall goes on."""
    idx = trials.prev[:, None] + lag_offsets[None, :]
    valid = (idx >= 0) & (idx < absorbing)
    f = trials.f
    return f.gather(1, idx.clamp(0, absorbing - 1)) * valid / (total - f[:, absorbing:])


def _count_lag(trials: _Trials, item: torch.Tensor, max_lag: int) -> None:
    """Add the one-hot lag of each trial's transition prev -> item (lags beyond max_lag count
    as transitions but in no lag)."""
    lag = (item - trials.prev + max_lag).clamp_(0, 2 * max_lag)
    inside = (item - trials.prev).abs() <= max_lag
    trials.counts.scatter_add_(1, lag[:, None], inside[:, None].to(trials.counts.dtype))


def _update_context(trials: _Trials, item: torch.Tensor, table: torch.Tensor, col_norm2: torch.Tensor) -> None:
    """t <- (1 - beta_rec) t + beta_rec t_IN / |t_IN|, normalised, with t_IN = (1 - gamma) e_j +
    gamma M e_j for the recalled item j; f = M^T t follows from rows j of M and M^T M."""
    br, gm = trials.br, trials.gm
    norm_in = torch.sqrt((1 - gm) ** 2 + gm**2 * col_norm2[item][:, None])
    w = br / norm_in
    rows_j = table[item]
    t = (1 - br) * trials.t + (w * gm) * rows_j[:, 0]
    t[torch.arange(item.numel()), item] += (w * (1 - gm)).squeeze(1)
    norm = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    trials.t = t / norm
    trials.f = ((1 - br) * trials.f + w * ((1 - gm) * rows_j[:, 1] + gm * rows_j[:, 2])) / norm


def simulate_counts(
    m: np.ndarray,
    beta_rec: torch.Tensor,
    gamma: torch.Tensor,
    s0: torch.Tensor,
    max_lag: int,
    max_samples: int,
    gen: torch.Generator,
    estimator: str = "sampled",
) -> torch.Tensor:
    """Simulate one recall trial per row, all rows at once, for one encoding matrix ``m``.

    Rows are given by their beta_rec, gamma and start position (1-d tensors of equal length).
    Returns per-row lag frequencies [rows, 2*max_lag+1]: counts of each lag over that trial's
    number of transitions (NaN for a trial with none), as the reference's ``estimateCRP``.
    With ``estimator="expected"`` each transition adds its conditional lag distribution (the
    sampling probabilities of the items around the previous one) instead of a one-hot count:
    the same trials, far less Monte-Carlo noise per trial (Rao-Blackwellised).

    The feature drive f = M^T t is carried along with t instead of recomputed: M^T t_IN is a
    combination of row j of M and of M^T M, so each step costs O(n) per trial, not O(n^2).
    """
    # float32 halves the memory traffic of these bandwidth-bound steps; t is renormalised
    # from its own values every step, so rounding does not accumulate.
    mm = torch.tensor(m, dtype=torch.float32)
    absorbing = mm.shape[0] - 1
    # One gather per step: rows j of M^T (the context item j was studied in), M and M^T M.
    table = torch.stack([mm.T, mm, mm.T @ mm], dim=1)  # [size, 3, size]
    col_norm2 = (mm**2).sum(dim=0)
    lag_offsets = torch.arange(-max_lag, max_lag + 1)
    trials = _start_trials(mm, beta_rec, gamma, s0, max_lag)
    out_counts = torch.zeros(s0.shape[0], 2 * max_lag + 1, dtype=torch.float64)
    out_trans = torch.zeros(s0.shape[0], dtype=torch.float64)
    for _ in range(max_samples):
        item, total = _sample_items(trials.f, gen, absorbing)
        # The lag distribution is read before the finished trials leave the batch.
        p = _lag_probabilities(trials, total, lag_offsets, absorbing) if estimator == "expected" else None
        going = item < absorbing
        if not bool(going.all()):
            trials.retire(~going, out_counts, out_trans)
            keep = going.nonzero().squeeze(1)
            trials, item = trials.select(keep), item[keep]
            p = p[keep] if p is not None else None
        if trials.alive.numel() == 0:
            break
        if p is not None:
            trials.counts += p
        else:
            _count_lag(trials, item, max_lag)
        trials.n_trans += 1
        trials.prev = item
        _update_context(trials, item, table, col_norm2)
    trials.retire(torch.ones(trials.alive.numel(), dtype=torch.bool), out_counts, out_trans)
    return out_counts / out_trans[:, None]


def simulate_grid(spec: GridSpec) -> np.ndarray:
    """Simulated CRPs over the grid: [n_enc, n_rec, n_gamma, 2*max_lag+1]."""
    n_rec, n_gam = len(spec.beta_rec), len(spec.gamma_ft)
    n_lags = 2 * spec.max_lag + 1
    out = np.zeros((len(spec.beta_enc), n_rec, n_gam, n_lags))
    br_axis = torch.tensor(spec.beta_rec, dtype=torch.float64)
    g_axis = torch.tensor(spec.gamma_ft, dtype=torch.float64)
    # Row layout: (i_rec, i_gamma, s0, sim), so per-cell means are reshapes.
    j, k, s, _ = torch.meshgrid(
        torch.arange(n_rec), torch.arange(n_gam), torch.arange(spec.n_starts), torch.arange(spec.n_sims), indexing="ij"
    )
    j, k, s = j.reshape(-1), k.reshape(-1), s.reshape(-1)
    for i, be in enumerate(spec.beta_enc):
        m_np = encode(be, spec.n_items)
        # One generator per beta_enc, seeded from (seed, i), so a grid is reproducible
        # whatever order or subset of beta_enc values is simulated.
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + i)
        freq = simulate_counts(
            m_np, br_axis[j], g_axis[k], s, spec.max_lag, spec.max_samples, gen, spec.estimator
        )
        per_trial = freq.numpy().reshape(n_rec, n_gam, spec.n_starts, spec.n_sims, n_lags)
        with np.errstate(invalid="ignore"):
            per_start = np.nanmean(per_trial, axis=3)
            per_start = per_start / per_start.sum(axis=-1, keepdims=True)
        if spec.closed_forms:
            for jj, b_rec in enumerate(spec.beta_rec):
                for kk, gam in enumerate(spec.gamma_ft):
                    if gam == 0 and b_rec in (0.0, 1.0):
                        per_start[jj, kk] = [
                            closed_form_crp(m_np, s0, b_rec, spec.n_items, spec.max_lag)
                            for s0 in range(spec.n_starts)
                        ]
        out[i] = np.nanmean(per_start, axis=2)
    return out


def cache_dir() -> Path:
    try:
        from interp.model.zoo import cache_root

        root = cache_root()
    except ImportError:  # the zoo module is optional for this model
        env = os.environ.get("INTERP_CACHE_DIR")
        if env:
            root = Path(env).expanduser()
        else:
            import platformdirs

            root = Path(platformdirs.user_cache_dir("interp-workbench"))
    return root / "cmr"


def cmr_grid(spec: GridSpec | None = None, use_cache: bool = True) -> CMRGrid:
    """The simulated grid, from the disk cache when present (written atomically otherwise)."""
    spec = spec or GridSpec()
    path = cache_dir() / f"crp-{spec.key()}.npz"
    if use_cache and path.exists():
        with np.load(path) as data:
            return CMRGrid(spec=spec, crp=data["crp"], seconds=float(data["seconds"]), cached=True)
    started = time.perf_counter()
    crp = simulate_grid(spec)
    seconds = time.perf_counter() - started
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, crp=crp, seconds=seconds, spec=json.dumps(asdict(spec)))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return CMRGrid(spec=spec, crp=crp, seconds=seconds, cached=False)


@dataclass
class CMRFit:
    """Per-head CMR fit: distance, fitted parameters and the scaled curves (lags -fit_lag..fit_lag)."""

    distance: np.ndarray  # [heads]
    beta_enc: np.ndarray
    beta_rec: np.ndarray
    gamma_ft: np.ndarray
    fitted: np.ndarray  # [heads, lags] CMR CRP shifted and scaled to the attention curve
    attn_scaled: np.ndarray  # [heads, lags] attention curve shifted to minimum 0
    lags: np.ndarray

    def labels(self) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore"):
            return {"cmr_like": self.distance < CMR_LIKE, "cmr_like_strict": self.distance < CMR_LIKE_STRICT}


def fit_cmr(attn: np.ndarray, lags: np.ndarray, grid: CMRGrid, fit_lag: int = FIT_LAG) -> CMRFit:
    """Fit each row of ``attn`` (a head's attention lag-CRP over ``lags``) by CMR distance.

    As the reference's ``get_head_mse``: restrict to |lag| <= fit_lag; shift the attention
    curve to minimum 0; normalise the CMR CRP, shift it to minimum 0 and scale its maximum to
    the attention maximum; distance = mean((crp - attn)^2) / var(attn); minimum over the grid.
    A flat attention curve has no variance and gets distance NaN.
    """
    attn = np.asarray(attn, dtype=np.float64)
    if attn.ndim != 2 or attn.shape[1] != len(lags):
        raise UserError(f"attention CRP must be [heads, {len(lags)}], got {attn.shape}")
    if fit_lag > grid.spec.max_lag or fit_lag > int(np.max(np.abs(lags))):
        raise UserError(f"fit_lag {fit_lag} exceeds the lags available")
    sel_a = np.abs(lags) <= fit_lag
    sel_c = np.abs(grid.spec.lags) <= fit_lag
    a = attn[:, sel_a]
    a = a - a.min(axis=1, keepdims=True)
    c = grid.crp.reshape(-1, grid.crp.shape[-1])[:, sel_c]
    c = c / c.sum(axis=1, keepdims=True)
    c = c - c.min(axis=1, keepdims=True)
    c_max = c.max(axis=1)
    var = a.var(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = c / c_max[:, None]  # [grid, lags], max 1 (NaN for a flat CRP)
        amax = a.max(axis=1)
        # mean((amax*unit - a)^2) expanded so the [heads, grid, lags] tensor is never built.
        n = a.shape[1]
        sq_u = (unit**2).sum(axis=1)
        cross = a @ unit.T
        sq_a = (a**2).sum(axis=1)
        mse = (amax[:, None] ** 2 * sq_u[None, :] - 2 * amax[:, None] * cross + sq_a[:, None]) / n
        dist = mse / var[:, None]
    dist = np.where(np.isfinite(dist), dist, np.inf)
    best = dist.argmin(axis=1)
    distance = dist[np.arange(len(best)), best]
    distance = np.where(np.isinf(distance) | (var == 0), np.nan, np.maximum(distance, 0.0))
    params = np.array([grid.params_of(int(b)) for b in best]).reshape(-1, 3)
    fitted = unit[best] * amax[:, None]
    return CMRFit(
        distance=distance,
        beta_enc=params[:, 0],
        beta_rec=params[:, 1],
        gamma_ft=params[:, 2],
        fitted=fitted,
        attn_scaled=a,
        lags=lags[sel_a],
    )


def describe(grid: CMRGrid) -> dict[str, Any]:
    s = grid.spec
    return {
        "grid_key": s.key(),
        "grid_shape": list(grid.crp.shape),
        "n_sims_per_start": s.n_sims,
        "n_starts": s.n_starts,
        "grid_seconds": grid.seconds,
        "grid_cached": grid.cached,
    }
