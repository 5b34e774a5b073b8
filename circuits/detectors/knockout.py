"""Attention knockout (Geva et al. 2023): blocking edges from the last position to subject,
non-subject or last positions in windows of layers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch

from circuits.detectors.facts_detector import KNOWN_METRICS, FactsConfig, _FactsDetector, _per_unit
from circuits.methods.tracing import TraceInput, _answer_probs, prepare_fact, rows_per_pass
from interp.errors import UserError
from interp.model.interventions import Intervention, Knockout
from interp.model.loaded import LoadedModel
from interp.patching.sweeps import window_layers
from interp.runs import tables
from interp.runs.config import param
from interp.runs.registry import Summary, UnitResult, register
from interp.runs.units import Unit
from interp.stats import Interval, mean_interval

if TYPE_CHECKING:
    import plotly.graph_objects as go


KNOCKOUT_SETS = ("subject", "non_subject", "last")


def knockout_keys(inp: TraceInput, which: str) -> tuple[int, ...]:
    s, e = inp.subject_range
    last = inp.n_tokens - 1
    if which == "subject":
        return tuple(range(s, e))
    if which == "non_subject":
        return tuple(i for i in range(inp.n_tokens) if not s <= i < e and i != last)
    if which == "last":
        return (last,)
    raise UserError(f"unknown knockout set {which!r} (known: {', '.join(KNOCKOUT_SETS)})")


def knockout_effects(
    model: LoadedModel, inp: TraceInput, *, window: int = 9, memory_mb: float = 512.0
) -> tuple[float, dict[str, np.ndarray]]:
    """p_clean and, per source set, the relative change of p(answer) with the last position's
    attention to that set blocked in the layer window centred at each layer (NaN where the set
    is empty). One clean row + one row per (set, layer), stacked and chunked."""
    n_layers = model.info.n_layers
    last = inp.n_tokens - 1
    variants: list[tuple[str, int, tuple[int, ...]]] = []
    for which in KNOCKOUT_SETS:
        keys = knockout_keys(inp, which)
        if keys:
            variants.extend((which, layer, keys) for layer in range(n_layers))
    per_pass = rows_per_pass(model, inp.n_tokens, memory_mb)
    with torch.no_grad():
        p_clean = float(_answer_probs(model.run(inp.tokens).logits, inp.target)[0])
    if p_clean <= 0:
        raise UserError("p(answer) is 0 on the clean run: the relative change is undefined")
    curves = {w: np.full(n_layers, np.nan) for w in KNOCKOUT_SETS}
    for v0 in range(0, len(variants), per_pass):
        chunk = variants[v0 : v0 + per_pass]
        ivs: list[Intervention] = [
            Knockout(layer=lw, query_positions=(last,), key_positions=keys, batch=(j,))
            for j, (_, layer, keys) in enumerate(chunk)
            for lw in window_layers(layer, window, n_layers)
        ]
        with torch.no_grad():
            logits = model.run(inp.tokens.expand(len(chunk), -1), interventions=ivs).logits
        p = _answer_probs(logits, inp.target).double().cpu().numpy()
        for j, (which, layer, _) in enumerate(chunk):
            curves[which][layer] = (p[j] - p_clean) / p_clean
    return p_clean, curves


@dataclass(frozen=True)
class AttentionKnockoutConfig(FactsConfig):
    """Parameters of attention knockout (Geva et al. 2023; each field's help says what it is)."""

    window: int = param(9, "layers blocked around each layer L: [L - w//2, L + w - w//2)", low=1)
    memory_mb: float = param(512.0, "memory budget of one forward pass", low=0, low_open=True)


@register
class AttentionKnockoutDetector(_FactsDetector[AttentionKnockoutConfig]):
    name = "attention-knockout"
    description = "Geva et al. attention knockout: block the last position's attention to subject / non-subject / itself"
    output = "curves"
    curve_axes: ClassVar[dict[str, tuple[str, str]]] = dict.fromkeys(
        KNOCKOUT_SETS, ("layer (centre of the blocked window)", "relative change of p(answer): (p - p_clean) / p_clean")
    )
    Config = AttentionKnockoutConfig

    def variant(self, cfg: AttentionKnockoutConfig) -> str:
        return "faithful"

    def method_text(self, cfg: AttentionKnockoutConfig) -> str:
        return (
            "attention knockout as Geva et al. 2023: the last position's attention edges to the subject, "
            "the non-subject positions or itself blocked in every head of a window of layers; metric = "
            "relative change of p(answer's first token)"
        )

    def run_unit(self, model: LoadedModel, cfg: AttentionKnockoutConfig, unit: Unit) -> UnitResult:
        if unit.group == "known":
            return self._known_unit(model, cfg)
        fact = self._fact_of(model, cfg, unit)
        inp = prepare_fact(model, fact)
        p_clean, curves = knockout_effects(model, inp, window=cfg.window, memory_mb=cfg.memory_mb)
        rows = [
            # A curve over layers (x) of no single head.
            (which, None, None, float(layer), float(y))
            for which, ys in curves.items()
            for layer, y in enumerate(ys)
            if not np.isnan(y)
        ]
        metrics: dict[str, Any] = {"p_clean": p_clean, "n_answer_tokens": inp.n_answer_tokens}
        if unit.index is None:
            metrics["known"] = self._single_known(model, fact, cfg)
        return UnitResult(tables={"curves": tables.curves(rows), "metrics": tables.metrics(metrics, n=1)})

    def finalize(
        self, model: LoadedModel, cfg: AttentionKnockoutConfig, results: Mapping[str, pd.DataFrame]
    ) -> Summary:
        per_unit = _per_unit(results["metrics"])
        fact_units = [u for u in per_unit if u != "known"]
        c = results["curves"]
        # x is the window's centre layer (older runs also stored it as the row's layer). Each point
        # is the mean change over the facts, with its t interval (none from one fact).
        per_point = c.groupby(["curve", "x"], as_index=False).agg(ys=("y", list))
        points = {(str(curve), float(x)): mean_interval(ys)
                  for curve, x, ys in zip(per_point["curve"], per_point["x"], per_point["ys"], strict=True)}
        summary: dict[str, Any] = {"n_facts": len(fact_units)}
        if "known" in per_unit:
            summary.update({k: per_unit["known"][k] for k in KNOWN_METRICS})
        # Each curve's largest drop (the first lowest point, layers in order) with its interval.
        intervals: dict[str, Interval] = {}
        for which in dict.fromkeys(curve for curve, _ in points):
            x, iv = min(((x, iv) for (curve, x), iv in points.items() if curve == which), key=lambda p: p[1].value)
            summary[f"min_layer_{which}"] = int(x)
            summary[f"min_change_{which}"] = iv.value
            intervals[f"min_change_{which}"] = iv
        warnings = []
        if any(per_unit[u].get("known", 1.0) == 0.0 for u in fact_units):
            warnings.append("the model does not predict this answer (top-1): the knockout may be meaningless")
        n_multi = sum(per_unit[u]["n_answer_tokens"] > 1 for u in fact_units)
        if n_multi:
            warnings.append(f"{n_multi} of {len(fact_units)} answers are several tokens: p of the first token used")
        curves = tables.interval_curves((curve, None, None, x, iv) for (curve, x), iv in points.items())
        summary["window"] = cfg.window
        return Summary(metrics=summary, intervals=intervals,
            warnings=warnings,
            tables={"curves": curves, "metrics": tables.metrics(summary, n=len(fact_units))},
        )


def knockout_figure(curves: pd.DataFrame) -> go.Figure:
    """Relative change of p(answer) per window-centre layer for each blocked source set."""
    import plotly.graph_objects as go

    from interp.figures import error_bars

    fig = go.Figure()
    for which in KNOCKOUT_SETS:
        c = pd.DataFrame(curves[curves["curve"] == which])
        if len(c):
            fig.add_trace(go.Scatter(x=c["x"], y=c["y"], name=f"last -> {which} blocked", error_y=error_bars(c)))
    x_title, y_title = AttentionKnockoutDetector.curve_axes[KNOCKOUT_SETS[0]]
    fig.update_layout(title="attention knockout", xaxis_title=x_title, yaxis_title=y_title)
    return fig
