"""The tables and statistics of a decore-eval run (circuits/detectors/decore_eval.py) from its
per-item rows: accuracy per task, split, method and k; the results table (k chosen on
validation, reported on test); the test accuracies' intervals and each method's paired
difference from greedy; DeCoRe-entropy's place among the random-head control's draws
(circuits/detectors/decore_draws.py); the k-sweep figure.

Intervals: 0/1 outcomes (greedy, the DeCoRe methods, a control of one draw) get Wilson's interval
(Wilson 1927), Newcombe's paired difference (Newcombe 1998, method 10) and McNemar's exact p
(``<task>:<method>:mcnemar_p``). The control's per-item values over several draws are fractions
(of draws that got the item right): the t interval, the paired t interval and the paired t test's
p (``<task>:control-entropy:paired_t_p``), as ``interp.stats`` picks for such values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from circuits.detectors.decore_draws import versus_random
from interp.runs import tables
from interp.stats import Interval, interval, mcnemar_exact_p, paired_interval, paired_p

if TYPE_CHECKING:
    import plotly.graph_objects as go

Task = Literal["nqswap", "memotrap", "closedbook"]
TASKS: tuple[Task, ...] = ("nqswap", "memotrap", "closedbook")
METHODS: tuple[str, ...] = ("greedy", "decore-vanilla", "decore-entropy", "control-entropy")


def accuracy_table(per_item: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per task, split, method and k: mean of ``correct`` over n items (and, on
    nqswap, the rate of memory answers); the control's per-item values are already means over
    its draws, so its accuracy is the mean over the draws."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in per_item.to_dict("records"):
        groups.setdefault((r["task"], r["split"], r["method"], int(r["k"])), []).append(r)
    rows = []
    for (task, split, method, k), rs in sorted(groups.items()):
        row = {"task": task, "split": split, "method": method, "k": k,
               "accuracy": float(np.mean([float(r["correct"]) for r in rs])), "n": len(rs)}
        # A task without memory answers has no "memory" (NaN where another task's rows have it).
        mem = [float(r["memory"]) for r in rs if r.get("memory") is not None and bool(pd.notna(r["memory"]))]
        if len(mem) == len(rs):
            row["memory_rate"] = float(np.mean(mem))
        rows.append(row)
    return pd.DataFrame(rows)


def results_table(acc: pd.DataFrame) -> pd.DataFrame:
    """Methods x tasks on the test split, k chosen per task and method on validation (the
    smallest k among ties); the control uses DeCoRe-entropy's chosen k."""
    by: dict[tuple[str, str, str, int], dict[str, Any]] = {
        (r["task"], r["method"], r["split"], int(r["k"])): r for r in acc.to_dict("records")
    }
    rows = []
    for task in [t for t in TASKS if any(key[0] == t for key in by)]:
        chosen: dict[str, int] = {}
        for method in METHODS:
            val = {key[3]: r["accuracy"] for key, r in by.items() if key[:3] == (task, method, "validation")}
            if not val:
                continue
            if method == "control-entropy" and "decore-entropy" in chosen:
                k = chosen["decore-entropy"]
            else:
                best = max(val.values())
                k = min(kk for kk, v in val.items() if v == best)
            chosen[method] = k
            test = by.get((task, method, "test", k))
            v = by[(task, method, "validation", k)]
            rows.append({
                "task": task, "method": method, "k": k,
                "test_accuracy": float(test["accuracy"]) if test else float("nan"),
                "n_test": int(test["n"]) if test else 0,
                "validation_accuracy": float(v["accuracy"]), "n_validation": int(v["n"]),
            })
    return pd.DataFrame(rows)


def sweep_figure(acc: pd.DataFrame, split: str = "validation") -> go.Figure:
    """Accuracy against k per task (one panel each), a line per method; greedy as a flat line."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tasks = [t for t in TASKS if t in set(acc["task"])]
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
    colors = {"greedy": "black", "decore-vanilla": "#1f77b4", "decore-entropy": "#d62728", "control-entropy": "#7f7f7f"}
    for c, task in enumerate(tasks, 1):
        recs = [r for r in acc.to_dict("records") if r["task"] == task and r["split"] == split]
        ks = sorted({int(r["k"]) for r in recs if r["method"] != "greedy"}) or [0]
        for method in METHODS:
            m = sorted((int(r["k"]), float(r["accuracy"])) for r in recs if r["method"] == method)
            if not m:
                continue
            x, y = (ks, [m[0][1]] * len(ks)) if method == "greedy" else ([p[0] for p in m], [p[1] for p in m])
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=method, legendgroup=method,
                                     showlegend=c == 1, line={"color": colors[method],
                                                             "dash": "dot" if method == "greedy" else "solid"}),
                          row=1, col=c)
        fig.update_xaxes(title_text="k (heads masked)", row=1, col=c)
    fig.update_yaxes(title_text=f"accuracy ({split})", row=1, col=1, range=[0, 1.02])
    fig.update_layout(title=f"DeCoRe: accuracy against k ({split} items)")
    return fig


def test_intervals(per: pd.DataFrame, table: pd.DataFrame) -> tuple[dict[str, Interval], dict[str, float]]:
    """Per row of the results table: the test accuracy's interval, and for a method other than
    greedy its paired difference from greedy on the test items both answered and its p, by metric
    name. 0/1 outcomes: Wilson, Newcombe and McNemar's exact p (``mcnemar_p``); the control's
    fractions over several draws: t, paired t and the paired t test's p (``paired_t_p``)."""
    intervals: dict[str, Interval] = {}
    p_values: dict[str, float] = {}
    test = per[per["split"] == "test"] if len(per) else per
    for r in table.to_dict("records"):
        task, method, k = r["task"], r["method"], int(r["k"])
        rows = pd.DataFrame(test[(test["task"] == task) & (test["method"] == method) & (test["k"] == k)])
        if not len(rows):
            continue
        correct = rows.set_index("item")["correct"].astype(float)
        intervals[f"{task}:{method}:test_accuracy"] = interval(correct.to_numpy())
        greedy = pd.DataFrame(test[(test["task"] == task) & (test["method"] == "greedy")]).set_index("item")["correct"]
        both = correct.index.intersection(greedy.index)
        if method == "greedy" or not len(both):
            continue
        a, b = correct.loc[both].to_numpy(), greedy.loc[both].astype(float).to_numpy()
        diff = intervals[f"{task}:{method}:minus_greedy"] = paired_interval(a, b)
        if diff.method == "newcombe":
            p_values[f"{task}:{method}:mcnemar_p"] = mcnemar_exact_p(a, b)
        else:
            p_values[f"{task}:{method}:paired_t_p"] = paired_p(a, b)
    return intervals, p_values


def per_item_rows(artifacts: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any] | None, list[dict[str, Any]]]:
    """The units' per-item results as one table (task, method, k and each item's row), the
    ranking unit's record (None when the heads were given) and the control's draw records."""
    per_rows = []
    ranking_rec = None
    draws: list[dict[str, Any]] = []
    for name, js in zip(artifacts["name"], artifacts["json"], strict=True):
        obj = json.loads(js)
        if name == "per_item":
            for r in obj["items"]:
                per_rows.append({"task": obj["task"], "method": obj["method"], "k": obj["k"], **r})
        elif name == "ranking":
            ranking_rec = obj
        elif name == "random_draws":
            draws += obj
    return pd.DataFrame(per_rows), ranking_rec, draws


def versus_random_metrics(acc: pd.DataFrame, table: pd.DataFrame, draws: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """DeCoRe-entropy's test accuracy among the control's draws, per task and k
    (circuits.detectors.decore_draws.versus_random)."""
    test = acc[(acc["method"] == "decore-entropy") & (acc["split"] == "test")] if len(acc) else acc
    decore = {(str(t), int(k)): float(a) for t, k, a in zip(test["task"], test["k"], test["accuracy"], strict=True)}
    chosen = {str(r["task"]): int(r["k"]) for r in table.to_dict("records") if r["method"] == "decore-entropy"}
    return versus_random(draws, decore, chosen)


def summary_tables(acc: pd.DataFrame, table: pd.DataFrame, versus: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """The final tables: accuracy per task, split, method and k as metrics and as curves
    against k, DeCoRe-entropy's percentile and p among the control's draws, and the results
    table (test accuracy at the k chosen on validation)."""
    cols = (acc["task"], acc["split"], acc["method"], acc["k"], acc["accuracy"])
    return {
        "metrics": tables.metric_rows(
            [(f"{t}:{s}:{m}:k{k}", a, None, None, n) for t, s, m, k, a, n in zip(*cols, acc["n"], strict=True)]
            + [(name, float(v), None, None, None) for name, v in versus.items() if isinstance(v, float | int)]
        ),
        # A method's accuracy is a share of n items (Wilson); the control's is a mean over its
        # draws, which no count of items bounds: no interval on its points.
        "curves": pd.concat([
            tables.rate_curves((f"{t}:{s}:{m}", None, None, float(k), a, n)
                               for t, s, m, k, a, n in zip(*cols, acc["n"], strict=True) if m != "control-entropy"),
            tables.curves((f"{t}:{s}:{m}", None, None, float(k), float(a))
                          for t, s, m, k, a in zip(*cols, strict=True) if m == "control-entropy"),
        ], ignore_index=True),
        "artifacts": tables.artifact("results_table", table.to_dict("records")),
    }
