"""CMR fits of each head's attention lag-CRP (Ji-An et al. 2024), each against its null: the
same head's lag-CRP read around random stand-ins for the matches (or shuffled over lags), fitted
the same way (:mod:`circuits.methods.cmr_null`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd

from circuits.detectors.lag_crp import LagListsConfig, _col, _finite, _LagCRPBase, lag_records, null_array
from circuits.methods import cmr_model, cmr_null
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.config import MAX_DRAWS, SEED_MAX, param
from interp.runs.registry import Summary, register
from interp.runs.units import Unit

if TYPE_CHECKING:
    import plotly.graph_objects as go


@dataclass(frozen=True)
class CMRConfig(LagListsConfig):
    """Parameters of ``cmr``: the shared lists (repeated random tokens by default), the
    simulated CMR grid and the null (match or lag-shuffled)."""

    grid_sims: int = param(cmr_model.GridSpec().n_sims, "CMR trials per start position and grid point", low=1)
    grid_estimator: Literal["sampled", "expected"] = param(cmr_model.GridSpec().estimator, "CMR CRP estimator")
    grid_seed: int = param(0, "seed of the CMR simulation", low=0, high=SEED_MAX)
    fit_lag: int = param(
        cmr_model.FIT_LAG, "lags -fit_lag..fit_lag enter the CMR distance (at most max_lag)",
        low=1, high=cmr_model.GridSpec().max_lag,
    )
    null_kind: Literal["match", "lags"] = param(
        "match", "null: lag-CRP around random stand-ins for the matches, or the lag-CRP shuffled over lags"
    )
    null_draws: int = param(cmr_null.NULL_DRAWS, "null lag-CRPs fitted per head", low=1, high=MAX_DRAWS)
    null_alpha: float = param(
        cmr_null.NULL_ALPHA, "a head is above its null when its empirical p is at most this",
        low=0, high=1, low_open=True, high_open=True,
    )
    null_seed: int = param(0, "seed of the null's draws", low=0, high=SEED_MAX)

    def check(self) -> None:
        super().check()
        if self.fit_lag > self.max_lag:
            raise UserError(f"fit_lag must be <= max_lag ({self.max_lag}), got {self.fit_lag}")
        # The smallest empirical p is 1 / (1 + null_draws): above null_alpha, no head could pass.
        if 1 / (1 + self.null_draws) > self.null_alpha:
            need = max(1, math.ceil(1 / self.null_alpha - 1))
            need += 1 / (1 + need) > self.null_alpha  # rounding of 1 / null_alpha
            raise UserError(f"null_draws must be >= {need} for null_alpha={self.null_alpha} "
                            f"(the smallest p is 1/(1+null_draws)), got {self.null_draws}")


def grid_spec(cfg: CMRConfig) -> cmr_model.GridSpec:
    return cmr_model.GridSpec(n_sims=cfg.grid_sims, estimator=cfg.grid_estimator, seed=cfg.grid_seed)


def cmr_records(
    crp: np.ndarray, lags: np.ndarray, grid: cmr_model.CMRGrid, fit_lag: int
) -> tuple[list[dict[str, Any]], cmr_model.CMRFit]:
    """Fit every head; one record per head (layer-major) with distance, parameters and labels."""
    n_l, n_h, _ = crp.shape
    fit = cmr_model.fit_cmr(crp.reshape(n_l * n_h, -1), lags, grid, fit_lag)
    labels = fit.labels()
    records = [
        {
            "layer": i // n_h,
            "head": i % n_h,
            "cmr_distance": float(fit.distance[i]),
            "beta_enc": float(fit.beta_enc[i]),
            "beta_rec": float(fit.beta_rec[i]),
            "gamma_ft": float(fit.gamma_ft[i]),
            "cmr_like": bool(labels["cmr_like"][i]),
            "cmr_like_strict": bool(labels["cmr_like_strict"][i]),
        }
        for i in range(n_l * n_h)
    ]
    return records, fit


def _by_layer(records: Sequence[Mapping[str, Any]], flag: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in records:
        if r[flag]:
            out[int(r["layer"])] = out.get(int(r["layer"]), 0) + 1
    return dict(sorted(out.items()))


def _fit_curve_rows(records: Sequence[Mapping[str, Any]], fit: cmr_model.CMRFit) -> list[tuple[str, int, int, float, float]]:
    """Each head's scaled CMR fit and shifted attention curve, as ``curves`` rows."""
    rows = []
    for idx, r in enumerate(records):
        for x, y in zip(fit.lags, fit.fitted[idx], strict=True):
            rows.append(("cmr_fit_scaled", r["layer"], r["head"], float(x), float(y)))
        for x, y in zip(fit.lags, fit.attn_scaled[idx], strict=True):
            rows.append(("attn_scaled", r["layer"], r["head"], float(x), float(y)))
    return rows


def _null_of(
    crp: np.ndarray, lags: np.ndarray, grid: cmr_model.CMRGrid, cfg: CMRConfig, results: Mapping[str, pd.DataFrame],
    distance: np.ndarray,
) -> cmr_null.CMRNull | None:
    """Every head (layer-major, its CMR ``distance`` already fitted) against its
    ``cfg.null_draws`` null lag-CRPs of ``cfg.null_kind`` (None: the units were stored before
    the null and hold none)."""
    n_l, n_h, n_lags = crp.shape
    if cfg.null_kind == "lags":
        return cmr_null.cmr_null(crp.reshape(n_l * n_h, -1), lags, grid, cfg.fit_lag, n_draws=cfg.null_draws,
                                 seed=cfg.null_seed, alpha=cfg.null_alpha, distance=distance)
    stored = null_array(results)
    if stored is None:
        return None
    null_crp = stored.reshape(n_l * n_h, -1, n_lags)
    null = cmr_null.fit_null_curves(null_crp, lags, grid, cfg.fit_lag)
    return cmr_null.against_null(distance, null, cfg.null_alpha)


def _add_null(records: Sequence[dict[str, Any]], null: cmr_null.CMRNull | None) -> tuple[str, ...]:
    """Each head's null fields (none without a null); the names of those stored as head scores."""
    if null is None:
        return ()
    for i, r in enumerate(records):
        r.update({"cmr_null_distance": float(null.median[i]), "cmr_null_p": float(null.p_value[i]),
                  "cmr_above_null": bool(null.above[i])})
    return ("cmr_null_distance", "cmr_null_p", "cmr_above_null")


def _null_metrics(records: Sequence[Mapping[str, Any]], cfg: CMRConfig) -> dict[str, Any]:
    """CMR-like heads counted both ways (distance threshold; above the null) over all heads."""
    n = len(records)
    like = sum(bool(r["cmr_like"]) for r in records)
    above = sum(bool(r["cmr_above_null"]) for r in records)
    n_fitted = sum(math.isfinite(r["cmr_distance"]) for r in records)
    return {
        "share_cmr_like": like / n,
        "n_above_null": above,
        "share_above_null": above / n,
        "n_cmr_like_above_null": sum(bool(r["cmr_like"] and r["cmr_above_null"]) for r in records),
        "above_null_by_layer": _by_layer(records, "cmr_above_null"),
        # Heads tested one by one at null_alpha: heads without any lag structure would still
        # pass at about this rate.
        "expected_above_null_by_chance": cfg.null_alpha * n_fitted,
        "null_draws": cfg.null_draws,
        "null_kind": cfg.null_kind,
        "null_alpha": cfg.null_alpha,
    }


def _null_curve_rows(records: Sequence[Mapping[str, Any]], null: cmr_null.CMRNull) -> list[tuple[str, int, int, float, float]]:
    """Every null draw's distance, per head, as ``curves`` rows (x: the draw)."""
    return [
        ("cmr_null_distance", r["layer"], r["head"], float(d), float(y))
        for r, row in zip(records, null.null, strict=True)
        for d, y in enumerate(row)
    ]


_NULL_TEXT = {"match": "each query's match replaced by a random first-list position",
              "lags": "the head's lag-CRP shuffled over the fitted lags"}


@register
class CMRDetector(_LagCRPBase[CMRConfig]):
    name = "cmr"
    description = "CMR fit of every head's attention lag-CRP (Ji-An et al.): distance, fitted parameters, CMR-like labels"
    head_columns: ClassVar[dict[str, str]] = {
        "cmr_distance": "distance", "cmr_like": "cmr-like", "cmr_null_p": "null p", "crp_plus1": "crp+1",
        "asymmetry": "asym", "beta_enc": "b_enc", "beta_rec": "b_rec", "gamma_ft": "g_ft"}
    curve_axes: ClassVar[dict[str, tuple[str, str]]] = {
        **_LagCRPBase.curve_axes,
        "attn_scaled": ("lag: key - matching position in the first list (tokens)", "attention weight, shifted to min 0 (CMR fit scaled to it)"),
        "cmr_fit_scaled": ("lag: key - matching position in the first list (tokens)", "attention weight, shifted to min 0 (CMR fit scaled to it)"),
        "cmr_null_distance": ("null draw (see the run's null_kind)", "CMR distance of the draw's lag-CRP"),
    }
    in_default_scan = True
    Config = CMRConfig

    def null_perms(self, cfg: CMRConfig, unit: Unit, length: int) -> np.ndarray | None:
        if cfg.null_kind != "match":
            return None
        # Seeded per unit: every unit's prompts get their own stand-in matches.
        rng = np.random.default_rng([cfg.null_seed, int(unit.index or 0)])
        return np.stack([rng.permutation(length) for _ in range(cfg.null_draws)])

    def variant(self, cfg: CMRConfig) -> str:
        # At most 40 characters while grid_sims has at most 7 digits.
        return f"{cfg.lists}-lists/cmr-grid-{cfg.grid_estimator}-{cfg.grid_sims}"

    def method_text(self, cfg: CMRConfig) -> str:
        return (f"attention lag-CRP of every head on {cfg.lists} lists, fitted by the CMR model (Ji-An et al. "
                f"2024) over a simulated parameter grid ({cfg.grid_estimator} estimator, {cfg.grid_sims} trials "
                f"per start position): distance = mean squared error / variance of the shifted attention curve "
                f"over lags -{cfg.fit_lag}..{cfg.fit_lag}; CMR-like below {cmr_model.CMR_LIKE}; above the null when "
                f"the distance's empirical p among the fits of {cfg.null_draws} null lag-CRPs ({_NULL_TEXT[cfg.null_kind]}) "
                f"is at most {cfg.null_alpha}")

    def finalize(self, model: LoadedModel, cfg: CMRConfig, results: Mapping[str, pd.DataFrame]) -> Summary:
        crp, lags, spc, table = self.aggregate(model, results)
        grid = cmr_model.cmr_grid(grid_spec(cfg))
        records, fit = cmr_records(crp, lags, grid, cfg.fit_lag)
        for r, extra in zip(records, lag_records(crp, lags, spc), strict=True):
            r.update({k: v for k, v in extra.items() if k not in ("layer", "head")})
        null = _null_of(crp, lags, grid, cfg, results, fit.distance)
        null_names = _add_null(records, null)
        dist = np.array([r["cmr_distance"] for r in records])
        order = np.argsort(np.nan_to_num(dist, nan=np.inf), kind="stable")
        ranked = [records[i] for i in order]
        heads = [_finite({**r, "score": -r["cmr_distance"]}) for r in ranked]
        warnings = []
        n_nan = int(np.isnan(dist).sum())
        if n_nan:
            warnings.append(f"{n_nan} heads have a flat lag-CRP (no variance): no CMR distance")
        if null is None:
            warnings.append("no null: the run's units were stored before the null (rerun with --fresh for it)")
        metrics = {
            "n_heads": len(records),
            "n_fitted": int(np.isfinite(dist).sum()),
            "n_cmr_like": sum(r["cmr_like"] for r in records),
            "n_cmr_like_strict": sum(r["cmr_like_strict"] for r in records),
            "cmr_like_threshold": cmr_model.CMR_LIKE,
            "cmr_like_strict_threshold": cmr_model.CMR_LIKE_STRICT,
            "cmr_like_by_layer": _by_layer(records, "cmr_like"),
            "cmr_like_strict_by_layer": _by_layer(records, "cmr_like_strict"),
            "median_distance": float(np.nanmedian(dist)),
            **(_null_metrics(records, cfg) if null is not None else {}),
            **cmr_model.describe(grid),
        }
        null_rows = _null_curve_rows(records, null) if null is not None else []
        curves = pd.concat([table, tables.curves(_fit_curve_rows(records, fit) + null_rows)], ignore_index=True)
        head_rows = [
            (m, r["layer"], r["head"], float(r[m]))
            for r in ranked
            for m in ("cmr_distance", "beta_enc", "beta_rec", "gamma_ft", "crp_plus1", "asymmetry", "primacy", "recency",
                      *null_names)
        ]
        return Summary(heads=heads,
            metrics=_finite(metrics),
            warnings=warnings,
            tables={
                "curves": curves,
                "head_scores": tables.head_scores(head_rows),
                "metrics": tables.metrics(metrics),
                "artifacts": tables.artifact("grid", cmr_model.describe(grid)),
            },
        )


def fig_lag_crp_fits(curves: pd.DataFrame, heads: Sequence[Mapping[str, Any]], n: int = 6) -> go.Figure:
    """Lag-CRP of the first ``n`` heads (attention shifted to min 0) with their scaled CMR fit."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    sel = list(heads)[:n]
    cols = min(3, max(1, len(sel)))
    rows = max(1, math.ceil(len(sel) / cols))
    titles = [f"L{h['layer']}H{h['head']} d={h.get('cmr_distance', float('nan')):.2f}" for h in sel]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles)
    for i, h in enumerate(sel):
        r, c = i // cols + 1, i % cols + 1
        for name, dash in (("attn_scaled", None), ("cmr_fit_scaled", "dash")):
            sel = (_col(curves, "curve") == name) & (_col(curves, "layer") == h["layer"]) & (_col(curves, "head") == h["head"])
            xs, ys = _col(curves, "x")[sel].astype(float), _col(curves, "y")[sel].astype(float)
            order = np.argsort(xs)
            fig.add_trace(
                go.Scatter(x=xs[order], y=ys[order], mode="lines+markers", name=name, line={"dash": dash},
                           showlegend=i == 0, legendgroup=name),
                row=r, col=c,
            )
    fig.update_layout(title="Attention lag-CRP (shifted) and CMR fit (scaled)")
    x_title, y_title = CMRDetector.curve_axes["attn_scaled"]
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title, col=1)
    return fig


def fig_cmr_layers(heads: Sequence[Mapping[str, Any]], n_layers: int) -> go.Figure:
    """Number of CMR-like heads (distance < 0.5, and < 0.1; above the null where stored) per layer."""
    import plotly.graph_objects as go

    df = pd.DataFrame(heads)
    layers = np.arange(n_layers)
    like = df[df["cmr_like"]].groupby("layer").size().reindex(layers, fill_value=0)
    strict = df[df["cmr_like_strict"]].groupby("layer").size().reindex(layers, fill_value=0)
    bars = [
        go.Bar(x=layers, y=like.values, name=f"distance < {cmr_model.CMR_LIKE}"),
        go.Bar(x=layers, y=strict.values, name=f"distance < {cmr_model.CMR_LIKE_STRICT}"),
    ]
    if "cmr_above_null" in df:  # runs stored before the null have no such field
        above = df[df["cmr_above_null"].fillna(False).astype(bool)].groupby("layer").size()
        bars.append(go.Bar(x=layers, y=above.reindex(layers, fill_value=0).values, name="above the null"))
    fig = go.Figure(bars)
    fig.update_layout(barmode="group", title="CMR-like heads by layer", xaxis_title="layer",
                      yaxis_title="CMR-like heads (count)")
    return fig
