"""CMR fits of each head's attention lag-CRP (Ji-An et al. 2024)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd

from circuits.detectors.lag_crp import LagListsConfig, _col, _finite, _LagCRPBase, lag_records
from circuits.methods import cmr_model
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.config import SEED_MAX, param
from interp.runs.registry import Summary, register

if TYPE_CHECKING:
    import plotly.graph_objects as go


@dataclass(frozen=True)
class CMRConfig(LagListsConfig):
    """Parameters of ``cmr``: the shared lists (repeated random tokens by default) and the
    simulated CMR grid."""

    grid_sims: int = param(cmr_model.GridSpec().n_sims, "CMR trials per start position and grid point", low=1)
    grid_estimator: Literal["sampled", "expected"] = param(cmr_model.GridSpec().estimator, "CMR CRP estimator")
    grid_seed: int = param(0, "seed of the CMR simulation", low=0, high=SEED_MAX)
    fit_lag: int = param(
        cmr_model.FIT_LAG, "lags -fit_lag..fit_lag enter the CMR distance (at most max_lag)",
        low=1, high=cmr_model.GridSpec().max_lag,
    )

    def check(self) -> None:
        super().check()
        if self.fit_lag > self.max_lag:
            raise UserError(f"fit_lag must be <= max_lag ({self.max_lag}), got {self.fit_lag}")


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


@register
class CMRDetector(_LagCRPBase[CMRConfig]):
    name = "cmr"
    description = "CMR fit of every head's attention lag-CRP (Ji-An et al.): distance, fitted parameters, CMR-like labels"
    head_columns: ClassVar[dict[str, str]] = {
        "cmr_distance": "distance", "cmr_like": "cmr-like", "crp_plus1": "crp+1", "asymmetry": "asym",
        "beta_enc": "b_enc", "beta_rec": "b_rec", "gamma_ft": "g_ft"}
    curve_axes: ClassVar[dict[str, tuple[str, str]]] = {
        **_LagCRPBase.curve_axes,
        "attn_scaled": ("lag: key - matching position in the first list (tokens)", "attention weight, shifted to min 0 (CMR fit scaled to it)"),
        "cmr_fit_scaled": ("lag: key - matching position in the first list (tokens)", "attention weight, shifted to min 0 (CMR fit scaled to it)"),
    }
    in_default_scan = True
    Config = CMRConfig

    def variant(self, cfg: CMRConfig) -> str:
        # At most 40 characters while grid_sims has at most 7 digits.
        return f"{cfg.lists}-lists/cmr-grid-{cfg.grid_estimator}-{cfg.grid_sims}"

    def method_text(self, cfg: CMRConfig) -> str:
        return (f"attention lag-CRP of every head on {cfg.lists} lists, fitted by the CMR model (Ji-An et al. "
                f"2024) over a simulated parameter grid ({cfg.grid_estimator} estimator, {cfg.grid_sims} trials "
                f"per start position): distance = mean squared error / variance of the shifted attention curve "
                f"over lags -{cfg.fit_lag}..{cfg.fit_lag}; CMR-like below {cmr_model.CMR_LIKE}")

    def finalize(self, model: LoadedModel, cfg: CMRConfig, results: Mapping[str, pd.DataFrame]) -> Summary:
        crp, lags, spc, table = self.aggregate(model, results)
        grid = cmr_model.cmr_grid(grid_spec(cfg))
        records, fit = cmr_records(crp, lags, grid, cfg.fit_lag)
        for r, extra in zip(records, lag_records(crp, lags, spc), strict=True):
            r.update({k: v for k, v in extra.items() if k not in ("layer", "head")})
        dist = np.array([r["cmr_distance"] for r in records])
        order = np.argsort(np.nan_to_num(dist, nan=np.inf), kind="stable")
        ranked = [records[i] for i in order]
        heads = [_finite({**r, "score": -r["cmr_distance"]}) for r in ranked]
        warnings = []
        n_nan = int(np.isnan(dist).sum())
        if n_nan:
            warnings.append(f"{n_nan} heads have a flat lag-CRP (no variance): no CMR distance")
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
            **cmr_model.describe(grid),
        }
        curves = pd.concat([table, tables.curves(_fit_curve_rows(records, fit))], ignore_index=True)
        head_rows = [
            (m, r["layer"], r["head"], float(r[m]))
            for r in ranked
            for m in ("cmr_distance", "beta_enc", "beta_rec", "gamma_ft", "crp_plus1", "asymmetry", "primacy", "recency")
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
    """Number of CMR-like heads (distance < 0.5, and < 0.1) per layer."""
    import plotly.graph_objects as go

    df = pd.DataFrame(heads)
    layers = np.arange(n_layers)
    like = df[df["cmr_like"]].groupby("layer").size().reindex(layers, fill_value=0)
    strict = df[df["cmr_like_strict"]].groupby("layer").size().reindex(layers, fill_value=0)
    fig = go.Figure([
        go.Bar(x=layers, y=like.values, name=f"distance < {cmr_model.CMR_LIKE}"),
        go.Bar(x=layers, y=strict.values, name=f"distance < {cmr_model.CMR_LIKE_STRICT}"),
    ])
    fig.update_layout(barmode="group", title="CMR-like heads by layer", xaxis_title="layer",
                      yaxis_title="CMR-like heads (count)")
    return fig
