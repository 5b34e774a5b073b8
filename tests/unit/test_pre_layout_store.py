"""A store written before the layout change (issue 24) opens, resumes and is reused today.

tests/data/store_pre_layout/results.db was written by interp-workbench at commit 7dbaffb, the
last main before the layout change (see tests/data/make_pre_layout_store.py): on the tiny Llama,
an induction run interrupted after one of its two units, and finished lag-crp and copying runs.
Then unit names were strings ("batch-0"), and copying's head ``score`` was the prefix-matching
score. Today units are typed values whose keys must match the stored names, and a finished run
that is found again re-makes its summary from its stored units with today's code, so an old
copying run ranks its heads by the copying score, as a fresh run does.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

from interp.runs.heads import heads
from interp.runs.runner import RunResult, find_or_run, run_detector
from interp.runs.store import Store
from tests.tiny import loaded, tiny_llama

OLD = Path(__file__).resolve().parents[1] / "data" / "store_pre_layout"


def _maker() -> ModuleType:
    """The script that wrote the store, for the parameters its runs were made with."""
    spec = importlib.util.spec_from_file_location("make_pre_layout_store", OLD.parent / "make_pre_layout_store.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = _maker()


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(OLD, ws)
    return ws


def _same(a: RunResult, b: RunResult) -> None:
    """Two runs' summaries agree: every metric and every head's fields."""
    assert a.summary.metrics.keys() == b.summary.metrics.keys()
    for key, value in b.summary.metrics.items():
        assert a.summary.metrics[key] == pytest.approx(value, rel=1e-6, nan_ok=True), key
    pd.testing.assert_frame_equal(pd.DataFrame(a.summary.heads), pd.DataFrame(b.summary.heads), rtol=1e-6)


def test_the_old_store_opens_with_its_runs(old_store: Path) -> None:
    with Store(old_store, create=False) as s:
        runs = s.runs().set_index("detector")
    assert runs.loc["induction", "status"] == "interrupted"
    assert (runs.loc["lag-crp", "status"], runs.loc["copying", "status"]) == ("done", "done")


def test_old_runs_resume_and_are_found_with_todays_numbers(old_store: Path, tmp_path: Path) -> None:
    model = loaded(tiny_llama())
    with Store(old_store) as s:
        ids = s.runs().set_index("detector")["id"]
        resumed = run_detector(model, "induction", MAKER.INDUCTION, s, progress=False)
        lag = find_or_run(model, "lag-crp", MAKER.LAG_CRP, s, progress=False)
        copying = find_or_run(model, "copying", MAKER.COPYING, s, progress=False)
        assert len(s.runs()) == 3, "an old run was recomputed beside itself"
    assert (resumed.run_id, resumed.computed_units) == (ids["induction"], 1)
    assert (lag.run_id, lag.reused) == (ids["lag-crp"], True)
    assert (copying.run_id, copying.reused) == (ids["copying"], True)
    with Store(tmp_path / "fresh") as f:
        for old, name, raw in ((resumed, "induction", MAKER.INDUCTION), (lag, "lag-crp", MAKER.LAG_CRP),
                               (copying, "copying", MAKER.COPYING)):
            _same(old, run_detector(model, name, raw, f, progress=False))


def test_an_old_copying_run_ranks_its_heads_by_the_copying_score(old_store: Path) -> None:
    with Store(old_store) as s:
        run_id = int(s.runs().set_index("detector")["id"]["copying"])
        final = s.run(run_id).to_frame("head_scores", "final")
    copying = final[final["metric"] == "copying"].set_index(["layer", "head"])["value"]
    ranked = heads(old_store, run_id)
    assert ranked.metric == "copying"
    assert list(ranked.heads) == list(copying.sort_values(ascending=False).index)
