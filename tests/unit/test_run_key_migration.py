"""Runs stored by the previous version resume after the typed configs (issue 15).

tests/data/store_v0_1/results.db was written by interp-workbench at commit fff6814 (see
tests/data/make_old_store.py): a decore-eval run on the tiny Llama, interrupted after two
units, its parameters stored as comma strings and its variant as the old
"uniform-mask;masked-prefill". Today the lists are tuples and the variant a slug, so the run
key differs; the store re-keys the old run when today's config reads its parameters the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from interp.runs.runner import run_detector
from interp.runs.store import Store
from tests.tiny import loaded, tiny_llama

OLD = Path(__file__).resolve().parents[1] / "data" / "store_v0_1"
# The command the old store's run was made with (tests/data/make_old_store.py's RAW).
RAW = {"heads": "0.1,1.2,2.3", "ks": "1,2", "tasks": "memotrap", "max_items": "2", "batch_size": "4"}


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(OLD, ws)
    return ws


def test_an_interrupted_run_of_the_previous_version_resumes(old_store: Path, tmp_path: Path) -> None:
    with Store(old_store) as s:
        [old] = s.runs().to_dict("records")
        assert (old["status"], old["n_units"], old["variant"]) == ("interrupted", 2, "uniform-mask;masked-prefill")
        assert json.loads(old["params_json"])["ks"] == "1,2"
        resumed = run_detector(loaded(tiny_llama()), "decore-eval", RAW, s, progress=False)
        [now] = s.runs().to_dict("records")
    assert resumed.run_id == old["id"]
    assert resumed.resumed_units == 2
    assert now["status"] == "done"
    assert now["variant"] == resumed.summary.variant != old["variant"]
    assert json.loads(now["params_json"])["ks"] == [1, 2]
    # The resumed run's numbers are those of a fresh run today.
    with Store(tmp_path / "fresh") as f:
        fresh = run_detector(loaded(tiny_llama()), "decore-eval", RAW, f, progress=False)
    assert fresh.resumed_units == 0
    assert fresh.summary.metrics.keys() == resumed.summary.metrics.keys()
    for key, value in fresh.summary.metrics.items():
        assert resumed.summary.metrics[key] == pytest.approx(value, nan_ok=True), key


def test_an_old_run_with_other_parameters_is_not_resumed(old_store: Path) -> None:
    with Store(old_store) as s:
        result = run_detector(loaded(tiny_llama()), "decore-eval", {**RAW, "ks": "1,3"}, s, progress=False)
        runs = s.runs()
    assert result.resumed_units == 0
    assert len(runs) == 2
    assert set(runs["status"]) == {"interrupted", "done"}  # the old run is left as it was
