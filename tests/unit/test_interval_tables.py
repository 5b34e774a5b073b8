"""A summary's intervals in its final ``metrics`` table (interp.runs.tables.with_intervals, called
by the runner for every detector): a metric's row takes its bounds and n, a metric without a row
gets one, the other rows and tables stay as they were; and a run's stored final metrics hold them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from interp.runs import tables
from interp.stats import Interval


def test_a_metric_row_takes_its_interval_and_a_new_one_is_appended() -> None:
    nan = float("nan")
    result = {"metrics": tables.metric_rows([("acc", 0.5, None, None, 8), ("k", 3.0, None, None, 8)]),
              "curves": tables.curves([("c", None, None, 0.0, 1.0)])}
    intervals = {"acc": Interval(0.5, 0.2, 0.8, 8, "wilson", 0.95), "diff": Interval(0.1, nan, nan, 1, "t", 0.95)}
    out = tables.with_intervals(result, intervals)
    rows = {r["name"]: r for r in out["metrics"].to_dict("records")}
    assert set(rows) == {"acc", "k", "diff"}
    assert (rows["acc"]["value"], rows["acc"]["ci_low"], rows["acc"]["ci_high"], rows["acc"]["n"]) == (0.5, 0.2, 0.8, 8)
    assert rows["k"]["value"] == 3.0
    assert pd.isna(rows["k"]["ci_low"])
    assert rows["diff"]["n"] == 1
    assert pd.isna(rows["diff"]["ci_low"])  # no interval from one value: stored as missing
    assert out["curves"] is result["curves"]
    assert len(result["metrics"]) == 2  # the detector's own table is not changed
    assert tables.with_intervals(result, {})["metrics"] is result["metrics"]
    only = tables.with_intervals({}, {"acc": intervals["acc"]})["metrics"]
    assert list(only["name"]) == ["acc"]
    assert isinstance(only, pd.DataFrame)


def test_a_stored_run_keeps_its_intervals_in_the_final_metrics(tiny_llama_hf: torch.nn.Module, tmp_path: Path) -> None:
    import copy

    from circuits.detectors import decore_eval  # noqa: F401  (registers decore-eval)
    from interp.runs.runner import run_detector
    from interp.runs.store import Store
    from tests.tiny import loaded

    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    raw = {"heads": "1.0,2.3", "ks": "1", "tasks": "memotrap", "max_items": 2}
    with Store(tmp_path) as store:
        result = run_detector(model, "decore-eval", raw, store, progress=False)
        final = store.run(result.run_id).results("metrics")
    final = pd.DataFrame(final[final["unit"] == "final"])
    assert result.summary.intervals
    for name, iv in result.summary.intervals.items():
        (row,) = pd.DataFrame(final[final["name"] == name]).to_dict("records")
        assert (row["value"], row["n"]) == (iv.value, iv.n), name
        assert (row["ci_low"], row["ci_high"]) == (iv.lo, iv.hi), name
