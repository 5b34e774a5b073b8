"""A store written before the layout change (issue 24) opens, resumes and is reused today.

tests/data/store_pre_layout/results.db was written by interp-workbench at commit 7dbaffb, the
last main before the layout change (see tests/data/make_pre_layout_store.py): on the tiny Llama,
an induction run interrupted after one of its two units, a finished induction run, and finished
lag-crp and copying runs.
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

from circuits.detectors.induction import InductionDetector
from interp.runs.heads import heads
from interp.runs.runner import RunResult, find_or_run, run_detector, run_in_memory
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


def _same(a: RunResult, b: RunResult, skip: frozenset[str] = frozenset()) -> None:
    """Two runs' summaries agree: every metric and every head's fields (but ``skip``)."""
    assert a.summary.metrics.keys() - skip == b.summary.metrics.keys() - skip
    for key, value in b.summary.metrics.items():
        if key not in skip:
            assert a.summary.metrics[key] == pytest.approx(value, rel=1e-6, nan_ok=True), key
    heads_a, heads_b = pd.DataFrame(a.summary.heads), pd.DataFrame(b.summary.heads)
    kept = [c for c in heads_b.columns if c not in skip]
    pd.testing.assert_frame_equal(heads_a[kept], heads_b[kept], rtol=1e-6)


# What the induction nulls (added after the layout change) put in a summary: an old unit has no
# twins, so these rest on the units computed today.
NULL_FIELDS = frozenset({
    "induction_null", "duplicate_token_null", "previous_token_null", "induction_above_null",
    "duplicate_token_above_null", "previous_token_above_null", "previous_token_above_uniform",
    *(f"{p}_{n}" for p in ("n", "share") for n in ("induction_above_null", "duplicate_token_above_null",
                                                     "previous_token_above_null", "previous_token_above_uniform")),
})


def test_the_old_store_opens_with_its_runs(old_store: Path) -> None:
    with Store(old_store, create=False) as s:
        runs = sorted(zip(s.runs()["detector"], s.runs()["status"], strict=True))
    assert runs == [("copying", "done"), ("induction", "done"), ("induction", "interrupted"), ("lag-crp", "done")]


def test_units_without_the_nulls_finalize_without_them() -> None:
    """Units stored before the nulls (no per-prompt artifact) give today's scores, no null."""
    model = loaded(tiny_llama())
    det = InductionDetector()
    cfg = det.parse_params(MAKER.INDUCTION_DONE)
    summary, results = run_in_memory(model, det, cfg)
    old = {t: f for t, f in results.items() if t != "artifacts"}
    old["head_scores"] = old["head_scores"][~old["head_scores"]["metric"].str.endswith("_null")]
    bare = det.finalize(model, cfg, old)
    assert any("stored before the nulls" in w for w in bare.warnings)
    assert "n_induction_above_null" not in bare.metrics
    assert summary.heads is not None
    assert bare.heads is not None
    assert [(h["layer"], h["head"], h["score"]) for h in bare.heads] == [
        (h["layer"], h["head"], h["score"]) for h in summary.heads]


def test_old_runs_resume_and_are_found_with_todays_numbers(old_store: Path, tmp_path: Path) -> None:
    model = loaded(tiny_llama())
    with Store(old_store) as s:
        ids = {(r["detector"], r["status"]): r["id"] for r in s.runs().to_dict("records")}
        resumed = run_detector(model, "induction", MAKER.INDUCTION, s, progress=False)
        # Induction has gained a parameter since (the nulls' level): a finished run is never
        # re-keyed, so the old one is not taken for today's and the run is made again.
        done = find_or_run(model, "induction", MAKER.INDUCTION_DONE, s, progress=False)
        lag = find_or_run(model, "lag-crp", MAKER.LAG_CRP, s, progress=False)
        copying = find_or_run(model, "copying", MAKER.COPYING, s, progress=False)
        assert len(s.runs()) == 5, "an old run of unchanged parameters was recomputed beside itself"
    assert (resumed.run_id, resumed.computed_units) == (ids["induction", "interrupted"], 1)
    assert not done.reused
    assert done.run_id not in ids.values()
    assert (lag.run_id, lag.reused) == (ids["lag-crp", "done"], True)
    assert (copying.run_id, copying.reused) == (ids["copying", "done"], True)
    # Half of the resumed run's prompts have twins: its nulls rest on them, and it says so.
    assert any("from 2 of 4 prompts" in w for w in resumed.summary.warnings)
    with Store(tmp_path / "fresh") as f:
        for old, name, raw, skip in ((resumed, "induction", MAKER.INDUCTION, NULL_FIELDS),
                                     (lag, "lag-crp", MAKER.LAG_CRP, frozenset()),
                                     (copying, "copying", MAKER.COPYING, frozenset())):
            _same(old, run_detector(model, name, raw, f, progress=False), skip | {"level", "level_per_head",
                                                                                  "previous_token_uniform"})


def test_an_old_copying_run_ranks_its_heads_by_the_copying_score(old_store: Path) -> None:
    with Store(old_store) as s:
        run_id = int(s.runs().set_index("detector")["id"]["copying"])
        final = s.run(run_id).to_frame("head_scores", "final")
    copying = final[final["metric"] == "copying"].set_index(["layer", "head"])["value"]
    ranked = heads(old_store, run_id)
    assert ranked.metric == "copying"
    assert list(ranked.heads) == list(copying.sort_values(ascending=False).index)
