"""Every figure names its axes: the builders of interp.figures on small hand-made frames, and
the curves of every registered detector, whose axis names the detector declares
(``Detector.curve_axes``) and the dashboard's curve plots use."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from circuits.data import conflicts
from circuits.detectors import (
    cmr,
    copying,
    decore_eval,
    decore_results,
    episodic_ablation,
    knockout,
    ph3,
    retrieval_masking,
)
from circuits.methods import tracing
from circuits.methods.cmr_model import GridSpec
from interp import figures
from interp.runs import tables
from interp.runs.registry import all_detectors, get_detector
from interp.runs.runner import run_in_memory
from tests.tiny import loaded, tiny_llama
from tests.unit.test_retrieval import GRID, HAYSTACK_TEXT, NEEDLE, force_output, wrap

BAD_TITLES = {"", "x", "y", "value"}


def _title(axis: Any) -> str:
    return str(axis.title.text or "").strip()


def _xy(fig: go.Figure) -> tuple[str, str]:
    return _title(fig.layout["xaxis"]), _title(fig.layout["yaxis"])


def _check_named(title: str, what: str) -> None:
    assert title.strip().lower() not in BAD_TITLES, f"{what} is titled {title!r}"


def _check_axes(fig: go.Figure, what: str) -> None:
    """Every x and y axis of the figure (subplots included) is named; heatmaps' colour bars too."""
    layout = fig.layout
    axes = sorted({"xaxis", "yaxis", *(k for k in layout.to_plotly_json() if k.startswith(("xaxis", "yaxis")))})
    for name in axes:
        _check_named(_title(layout[name]), f"{what}: {name}")
    for trace in fig.data:
        if isinstance(trace, go.Heatmap) and trace.showscale is not False:
            _check_named(_title(trace.colorbar), f"{what}: colour bar")
            assert _title(trace.colorbar).lower() != "score", f"{what}: colour bar says only 'score'"


# ------------------------------------------------------------------ interp.figures builders


def _heads() -> pd.DataFrame:
    return pd.DataFrame(
        [("retrieval", layer, head, 0.1 * layer + 0.05 * head) for layer in range(3) for head in range(2)],
        columns=["metric", "layer", "head", "value"],
    )


def _curves() -> pd.DataFrame:
    rows = [("lag_crp", 1, 0, float(x), 0.1 * x) for x in (-1, 0, 1)]
    rows += [("serial_position", 1, 0, float(x), 0.2) for x in (0, 1, 2, 3)]
    return pd.DataFrame(rows, columns=["curve", "layer", "head", "x", "y"])


AXES = {"lag_crp": ("lag (tokens)", "attention weight"), "serial_position": ("serial position", "attention weight")}


def _builder_cases() -> dict[str, Callable[[], go.Figure | list[go.Figure]]]:
    hs = _heads()
    other = hs.assign(value=hs["value"] * 2)
    tl = pd.DataFrame(
        [("state", "f1", t, f"tok{t}", layer, 0.1 * t) for t in range(3) for layer in range(2)],
        columns=["kind", "item", "token_index", "token", "layer", "value"],
    )
    da, db = figures.depth_normalised(hs, 3), figures.depth_normalised(other, 3)
    return {
        # As the dashboard calls it: the rows of one metric, metric=None.
        "head_heatmap": lambda: figures.head_heatmap(hs, None, threshold=0.2, title="retrieval"),
        "token_layer_heatmap": lambda: figures.token_layer_heatmap(tl, None, "f1", marked_tokens=[1]),
        "head_curves_figures": lambda: figures.head_curves_figures(_curves(), 1, 0, axes=AXES),
        "curves_figure": lambda: figures.curves_figure(_curves(), "lag_crp", axes=AXES),
        "attention_pattern_figure": lambda: figures.attention_pattern_figure(np.eye(3), ["a", "b", "c"]),
        "compare_depth_figure": lambda: figures.compare_depth_figure(da, db),
        "difference_heatmap": lambda: figures.difference_heatmap(hs, other),
        "depth_difference_figure": lambda: figures.depth_difference_figure(figures.depth_difference(da, db)),
        "depth_strip_figure": lambda: figures.depth_strip_figure(
            pd.DataFrame({"model": ["a", "b"], "label": ["L0H1", "L2H0"], "relative_depth": [0.0, 0.5],
                          "score": [0.3, 0.9]}), title="induction: top heads"),
    }


def _builders() -> list[str]:
    """Every public function of interp.figures that returns a figure (or a list of them)."""
    return sorted(
        name
        for name, fn in inspect.getmembers(figures, inspect.isfunction)
        if fn.__module__ == figures.__name__
        and not name.startswith("_")
        and "Figure" in str(inspect.signature(fn).return_annotation)
    )


def test_every_builder_has_a_case() -> None:
    assert _builders() == sorted(_builder_cases())


@pytest.mark.parametrize("name", _builders())
def test_builder_names_its_axes(name: str) -> None:
    out = _builder_cases()[name]()
    figs = out if isinstance(out, list) else [out]
    assert figs
    for fig in figs:
        _check_axes(fig, name)


def test_curve_axes_come_from_the_detector_declaration() -> None:
    axes = {"*: accuracy vs depth": ("needle depth", "accuracy"), "exact": ("a", "b")}
    assert figures.curve_axes(axes, "top3: accuracy vs depth") == ("needle depth", "accuracy")
    assert figures.curve_axes(axes, "exact") == ("a", "b")
    assert figures.curve_axes(axes, "other") == figures.UNDECLARED_AXES
    assert figures.curve_axes(None, "exact") == figures.UNDECLARED_AXES
    frame = pd.DataFrame({"curve": ["none: accuracy vs depth"] * 2, "layer": [-1, -1], "head": [-1, -1],
                          "x": [0.0, 1.0], "y": [1.0, 0.5]})
    fig = figures.curves_figure(frame, axes=axes)
    assert _xy(fig) == ("needle depth", "accuracy")
    # A curve no detector declares still gets named axes that say so.
    fig = figures.curves_figure(frame)
    assert _xy(fig) == figures.UNDECLARED_AXES
    # head_curves_figures: each figure's axes from its curves' declarations.
    [lag, spc] = figures.head_curves_figures(_curves(), 1, 0, axes=AXES)
    assert _xy(lag) == AXES["lag_crp"]
    assert _xy(spc) == AXES["serial_position"]


def test_curve_of_no_head_is_one_line() -> None:
    # An attention-knockout curve: layer is its x, head -1; one line, not one trace per point.
    frame = pd.DataFrame({"curve": ["subject"] * 3, "layer": [0, 1, 2], "head": [-1, -1, -1],
                          "x": [0.0, 1.0, 2.0], "y": [-0.1, -0.5, -0.2]})
    fig = figures.curves_figure(frame)
    assert len(fig.data) == 1
    assert list(fig.data[0].y) == [-0.1, -0.5, -0.2]  # type: ignore[attr-defined]
    assert fig.data[0].name == "subject"  # type: ignore[attr-defined]
    # Per-head curves stay one line per head.
    heads = pd.DataFrame({"curve": ["c"] * 4, "layer": [0, 0, 1, 1], "head": [1, 1, 2, 2],
                          "x": [0.0, 1.0, 0.0, 1.0], "y": [1.0, 2.0, 3.0, 4.0]})
    assert [t.name for t in figures.curves_figure(heads).data] == ["L0H1", "L1H2"]  # type: ignore[attr-defined]


# ------------------------------------------------------------------ the circuits' figure helpers


def _check_helper_axes(fig: go.Figure, what: str) -> None:
    """Every x axis (one per subplot) and the first y axis named (the others share it or are
    named too); every colour bar shown named."""
    layout = fig.layout.to_plotly_json()
    xs = [k for k in layout if k.startswith("xaxis")] or ["xaxis"]
    for name in xs:
        _check_named(_title(fig.layout[name]), f"{what}: {name}")
    _check_named(_title(fig.layout["yaxis"]), f"{what}: yaxis")
    for trace in fig.data:
        if isinstance(trace, go.Heatmap) and trace.showscale is not False:
            _check_named(_title(trace.colorbar), f"{what}: colour bar")


def _helper_cases() -> dict[str, Callable[[], go.Figure]]:
    import torch

    from circuits.detectors import conflict_heads as ch
    from circuits.detectors import retrieval as rt

    heads = [{"layer": la, "head": h, "score": 0.1 * (la + h), "prefix_matching": 0.2 * la, "copying": 0.1 * h - 0.1,
              "cmr_distance": 0.3, "cmr_like": la > 0, "cmr_like_strict": la > 1} for la in range(3) for h in range(2)]
    lag = [("attn_scaled", 1, 0, float(x), abs(x) * 0.1) for x in (-1, 0, 1)]
    lag += [("cmr_fit_scaled", 1, 0, float(x), abs(x) * 0.2) for x in (-1, 0, 1)]
    inp = tracing.TraceInput("p", "s", "a", torch.zeros(1, 3, dtype=torch.long), (1, 2), 5, 1, ("<s>", "w1", "w2"))
    trace = tracing.TraceResult(inp, 0.5, 0.1, {"mlp": np.full((3, 2), 0.3)}, 0.1, 2, 2, 0)
    ablation: dict[str, Any] = {"k": 2, "score": "cmr", "method": "zero"}
    for metric in ("icl", "icl_window", "second_copy_loss"):
        for group in ("top", "random"):
            ablation[f"{metric}_delta_{group}"] = 0.5
            ablation[f"{metric}_delta_{group}_ci"] = [0.2, 0.8]
    samples = pd.DataFrame({"depth": [0.0, 0.0, 1.0, 1.0], "length": [16, 24, 16, 24], "correct": [1, 0, 1, 1]})
    acc = pd.DataFrame([{"task": "memotrap", "split": "validation", "method": m, "k": k, "accuracy": 0.5}
                        for m in decore_eval.METHODS for k in (1, 3)])
    scaling = pd.DataFrame({"layer": [1, 1], "head": [0, 0], "format": ["qa", "qa"], "factor": [0.0, 2.0],
                            "context_rate": [0.2, 0.6], "memory_rate": [0.7, 0.3]})
    rates = pd.DataFrame({"format": ["qa"], "split": ["test"], "memory_rate": [0.5], "context_rate": [0.3],
                          "other_rate": [0.2]})
    scores = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "effect": [0.1, -0.2, 0.3, 0.0]})
    buckets = pd.DataFrame({"kind": ["avg_indirect_mlp"] * 2, "token": ["last_subject", "last"], "layer": [0, 0],
                            "value": [0.2, 0.1]})
    knock = pd.DataFrame({"curve": ["subject"] * 2, "layer": [0, 1], "head": [-1, -1], "x": [0.0, 1.0],
                          "y": [-0.2, -0.6]})
    return {
        "causal_trace.heatmap_figure": lambda: tracing.heatmap_figure(trace, "mlp"),
        "causal_trace.heatmap_figure(indirect)": lambda: tracing.heatmap_figure(trace, "mlp", indirect=True),
        "causal_trace.bucket_figure": lambda: tracing.bucket_figure(buckets),
        "causal_trace.knockout_figure": lambda: knockout.knockout_figure(knock),
        "episodic.fig_induction_copying": lambda: copying.fig_induction_copying(heads),
        "episodic.fig_lag_crp_fits": lambda: cmr.fig_lag_crp_fits(tables.curves(lag), heads, n=2),
        "episodic.fig_cmr_layers": lambda: cmr.fig_cmr_layers(heads, 3),
        "episodic.fig_ablation": lambda: episodic_ablation.fig_ablation(ablation),
        "decore_results.sweep_figure": lambda: decore_results.sweep_figure(acc),
        "ph3.scaling_figure": lambda: ph3.scaling_figure(scaling),
        "conflict_heads.head_map_figure": lambda: ch.head_map_figure(scores, "effect", "memory heads"),
        "conflict_heads.rates_figure": lambda: ch.rates_figure(rates),
        "retrieval.score_heatmap": lambda: rt.score_heatmap(heads, 3, 2),
        "retrieval.accuracy_heatmaps": lambda: retrieval_masking.accuracy_heatmaps(samples, {"unmasked": "correct"}),
    }


@pytest.mark.parametrize("name", sorted(_helper_cases()))
def test_circuits_figure_helper_names_its_axes(name: str) -> None:
    _check_helper_axes(_helper_cases()[name](), name)


# ------------------------------------------------------------------ detectors' curves


def _emitted(det: Any, model: Any, raw: dict[str, Any]) -> set[str]:
    """Curve names a real run writes: its units' tables and its final summary."""
    summary, results = run_in_memory(model, det, det.parse_params(raw))
    out: set[str] = set()
    for found in (summary.tables, results):
        frame = found.get("curves")
        if frame is not None:
            out |= {str(c) for c in frame["curve"]}
    return out


def _needle_files(tmp: Path) -> dict[str, str]:
    (tmp / "hay.txt").write_text(HAYSTACK_TEXT)
    (tmp / "needles.jsonl").write_text(json.dumps(NEEDLE) + "\n")
    return {"haystack_file": str(tmp / "hay.txt"), "needles_file": str(tmp / "needles.jsonl")}


def _retrieval(tmp: Path, mp: pytest.MonkeyPatch) -> set[str]:
    model = wrap(force_output(tiny_llama()))
    return _emitted(get_detector("retrieval"), model, {**_needle_files(tmp), **GRID, "min_counted": 1})


def _retrieval_masking(tmp: Path, mp: pytest.MonkeyPatch) -> set[str]:
    model = wrap(force_output(tiny_llama()))
    raw = {**_needle_files(tmp), **GRID, "heads": "1.2,0.1,2.3,0.0", "top_k": 2, "n_random": 1, "exclude_top": 4}
    return _emitted(get_detector("retrieval-masking"), model, raw)


LAG = {"seq_len": 12, "n_prompts": 2, "batch_size": 2, "max_lag": 4}


def _lag_crp(tmp: Path, mp: pytest.MonkeyPatch) -> set[str]:
    return _emitted(get_detector("lag-crp"), loaded(tiny_llama()), {**LAG, "lists": "repeated"})


def _cmr(tmp: Path, mp: pytest.MonkeyPatch) -> set[str]:
    # A small CMR grid (the default one takes minutes to simulate), cached under tmp.
    mp.setenv("INTERP_CACHE_DIR", str(tmp))
    small = GridSpec(beta_enc=(0.5,), beta_rec=(0.0, 0.5), gamma_ft=(0.0, 0.5), n_items=20, n_starts=2)
    mp.setattr(cmr, "grid_spec", lambda params: small)
    return _emitted(get_detector("cmr"), loaded(tiny_llama()), {**LAG, "lists": "repeated", "fit_lag": 2})


def _episodic_ablation(tmp: Path, mp: pytest.MonkeyPatch) -> set[str]:
    raw = {"score": "induction", "k": 1, "n_draws": 1, "seq_len": 64, "late": 50, "early": 10, "window": 5,
           "n_single": 0, "cum_sizes": "", "rep_len": 10, "rep_prompts": 2, "n_texts": 1}
    return _emitted(get_detector("episodic-ablation"), loaded(tiny_llama()), raw)


FACT = {"prompt": "w5 w9 w17 w23 w40 w41 w7 w8", "subject": "w17 w23 w40", "answer": "w11"}


def _attention_knockout(tmp: Path, mp: pytest.MonkeyPatch) -> set[str]:
    return _emitted(get_detector("attention-knockout"), loaded(tiny_llama()), {**FACT, "window": 2})


def _causal_trace(tmp: Path, mp: pytest.MonkeyPatch) -> set[str]:
    raw = {**FACT, "samples": 2, "kinds": "state", "window": 2}
    return _emitted(get_detector("causal-trace"), loaded(tiny_llama()), raw)


def _induction(tmp: Path, mp: pytest.MonkeyPatch) -> set[str]:
    return _emitted(get_detector("induction"), loaded(tiny_llama()), {"seq_len": 8, "n_prompts": 2, "batch_size": 2})


def _copying(tmp: Path, mp: pytest.MonkeyPatch) -> set[str]:
    return _emitted(get_detector("copying"), loaded(tiny_llama()), {"seq_len": 10, "n_prompts": 2})


# ph3 and decore-eval need a model that knows the facts (a tiny random model knows none):
# their curve names, as their code builds them, from the module constants they come from.
def _ph3(tmp: Path, mp: pytest.MonkeyPatch) -> set[str]:
    names = {f"validation.{d}.{target}" for d, (_, target, _) in ph3.DIRECTIONS.items()}
    return names | {f"test.scale_value.{f}.{rate}" for f in conflicts.FORMATS for rate in ("context_rate", "memory_rate")}


def _decore_eval(tmp: Path, mp: pytest.MonkeyPatch) -> set[str]:
    return {f"{t}:{s}:{m}" for t in decore_eval.TASKS for s in ("validation", "test") for m in decore_eval.METHODS}


def _conflict_heads(tmp: Path, mp: pytest.MonkeyPatch) -> set[str]:
    # Path patching needs known facts too; its module writes no curves table at all.
    source = inspect.getsource(inspect.getmodule(all_detectors()["conflict-heads"]))  # type: ignore[arg-type]
    assert '"curves"' not in source
    return set()


def _edges(name: str) -> Callable[[Path, pytest.MonkeyPatch], set[str]]:
    def emitted(tmp: Path, mp: pytest.MonkeyPatch) -> set[str]:
        # Edge detectors store edges (an artifact) and metrics; no curves table.
        source = inspect.getsource(inspect.getmodule(all_detectors()[name]))  # type: ignore[arg-type]
        assert '"curves"' not in source
        return set()

    return emitted


EMITTED: dict[str, Callable[[Path, pytest.MonkeyPatch], set[str]]] = {
    "retrieval": _retrieval,
    "retrieval-masking": _retrieval_masking,
    "lag-crp": _lag_crp,
    "cmr": _cmr,
    "episodic-ablation": _episodic_ablation,
    "attention-knockout": _attention_knockout,
    "causal-trace": _causal_trace,
    "induction": _induction,
    "copying": _copying,
    "ph3": _ph3,
    "decore-eval": _decore_eval,
    "conflict-heads": _conflict_heads,
    "path-patching": _edges("path-patching"),
    "circuit": _edges("circuit"),
}
WRITES_NO_CURVES = {"causal-trace", "induction", "copying", "conflict-heads", "path-patching", "circuit"}


@pytest.mark.parametrize("name", sorted(all_detectors()))
def test_every_curve_a_detector_writes_has_axis_names(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert name in EMITTED, f"new detector {name!r}: add how to get the curve names it writes to EMITTED"
    cls = all_detectors()[name]
    emitted = EMITTED[name](tmp_path, monkeypatch)
    assert bool(emitted) == (name not in WRITES_NO_CURVES), sorted(emitted)
    for curve in sorted(emitted):
        x, y = figures.curve_axes(cls.curve_axes, curve)
        assert (x, y) != figures.UNDECLARED_AXES, f"{name}: curve {curve!r} has no declared axis names"
        _check_named(x, f"{name}: {curve} x")
        _check_named(y, f"{name}: {curve} y")
    # And no declaration is dead (a typo in a pattern would leave its curves undeclared).
    for pattern in cls.curve_axes:
        assert any(figures.curve_axes({pattern: ("a", "b")}, c) == ("a", "b") for c in emitted), (name, pattern)
