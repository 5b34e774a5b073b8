"""The Conflicts page shows a stored run's memory and context rates as stored (issue 27): a run
written here by hand, read back from the page's rates table, row by row."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from interp.runs.registry import UnitResult
from interp.runs.store import Store

APP = Path(__file__).resolve().parents[2] / "app"
RATES = [("memory_rate:none", 0.4, 0.2, 0.6, 20), ("context_rate:none", 0.55, 0.35, 0.75, 20),
         ("Memory_Rate:top3", 0.1, None, None, 20)]
OTHERS = [("n_items", 20.0, None, None, 20), ("accuracy", 0.9, None, None, 20)]


def test_the_rates_table_holds_the_stored_rates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    with Store(tmp_path) as s:
        run = s.start_run(model="toy", model_hash=None, detector="ph3", variant="zero", params={},
                          dataset_hash=None, seed=None, code_version=None, provenance={"source": "object"})
        metrics = pd.DataFrame(RATES + OTHERS, columns=["name", "value", "ci_low", "ci_high", "n"])
        run.commit_unit("final", UnitResult({"metrics": metrics}), 0.0)
        run.finish("done")
    monkeypatch.setenv("INTERP_WORKSPACE", str(tmp_path))
    monkeypatch.syspath_prepend(str(APP))
    at = AppTest.from_file(str(APP / "pages/3_Conflicts.py"), default_timeout=120)
    at.query_params["run"] = str(run.id)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(m.value == "**memory / context rates**" for m in at.markdown)
    shown = [df.value for df in at.dataframe if "name" in df.value.columns and
             set(df.value["name"]) & {r[0] for r in RATES}]
    assert shown, "no rates table on the page"
    table = shown[0]
    # Exactly the rows whose name says "rate" (any case), in stored order, with their numbers.
    assert list(table["name"]) == [r[0] for r in RATES]
    assert list(table["value"]) == [r[1] for r in RATES]
    assert list(table["n"]) == [r[4] for r in RATES]
    lows = [None if pd.isna(v) else v for v in table["ci_low"]]
    assert lows == [r[2] for r in RATES]
    sys.modules.pop("dashboard", None)
