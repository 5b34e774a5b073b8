"""The default scan fills every dashboard page (issue 18, point 5).

``interp scan`` runs each detector with its declared scan parameters (small: a few facts, a small
split), checked before any model is loaded, while ``interp run`` keeps the detector's own
defaults. Every page of the dashboard (app/routing.PAGES, which the pages filter their runs
with) lists a run of the default scan: checked on the declaration and on the rendered pages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest

from app import routing
from circuits.detectors.induction import InductionDetector
from interp.runs import registry
from interp.runs.registry import UnitResult, all_detectors, default_scan
from interp.runs.store import Store
from tests.tiny import run_cli

APP = Path(__file__).resolve().parents[2] / "app"

NO_MODEL = "/nonexistent/model"
# Each page's file and the key of the selectbox that lists its runs (Compare: its detectors).
PAGE_FILES = {
    "Head maps": ("pages/1_Head_maps.py", "hm-run"),
    "Causal tracing": ("pages/2_Causal_tracing.py", "ct-run"),
    "Conflicts": ("pages/3_Conflicts.py", "cf-run"),
    "Compare": ("pages/4_Compare.py", "cmp-detector"),
}


def _routes() -> dict[str, routing.Route]:
    return {name: routing.Route.of(cls) for name, cls in all_detectors().items()}


def test_every_page_lists_a_detector_of_the_default_scan() -> None:
    scan = set(default_scan())
    assert set(routing.PAGES) == set(PAGE_FILES)
    for name, page in routing.PAGES.items():
        shown = set(page.detectors(_routes()))
        assert shown & scan, f"{name} shows {sorted(shown)}; the default scan runs none of them ({sorted(scan)})"


def test_the_default_scan_traces_facts_and_finds_conflict_heads_on_small_settings() -> None:
    dets = all_detectors()
    assert {"causal-trace", "conflict-heads"} <= set(default_scan())
    trace = dets["causal-trace"].parse_params(dets["causal-trace"].scan_params)
    assert trace.limit <= 3
    assert trace.samples < dets["causal-trace"].parse_params({}).samples
    heads = dets["conflict-heads"].parse_params(dets["conflict-heads"].scan_params)
    assert 0 < heads.max_items < dets["conflict-heads"].parse_params({}).max_items


@pytest.mark.parametrize("name", sorted(all_detectors()))
def test_scan_params_pass_validation(name: str) -> None:
    cls = all_detectors()[name]
    params = cls.parse_params(cls.scan_params)  # unknown names, ranges and relations
    for key, raw in cls.scan_params.items():
        assert getattr(params, key) == next(p for p in cls.params if p.name == key).parse(raw)


class _Probe(InductionDetector):
    """Induction under another name, with scan parameters, registered for one test."""

    name = "scan-params-probe"
    in_default_scan = False
    scan_params: ClassVar[dict[str, Any]] = {"seq_len": 4, "n_prompts": 2, "batch_size": 1}


class _BadProbe(_Probe):
    name = "scan-params-bad"
    scan_params: ClassVar[dict[str, Any]] = {"seq_len": 1}  # seq_len must be >= 2


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.all_detectors()  # discover first, so the probes are added to a full registry
    monkeypatch.setitem(registry._REGISTRY, _Probe.name, _Probe)  # pyright: ignore[reportPrivateUsage]
    monkeypatch.setitem(registry._REGISTRY, _BadProbe.name, _BadProbe)  # pyright: ignore[reportPrivateUsage]


def test_scan_runs_with_scan_params_and_run_keeps_the_defaults(
    probes: None, tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "ws"
    code, out, err = run_cli(capsys, ["scan", "-d", _Probe.name, "-m", str(tiny_folder), "-w", str(ws), "--json"])
    assert code == 0, err
    assert _Probe.name in json.loads(out)["detectors"]
    code, _, err = run_cli(capsys, ["run", _Probe.name, "--n-prompts", "1", "--batch-size", "1",
                                 "-m", str(tiny_folder), "-w", str(ws), "--json"])
    assert code == 0, err
    with Store(ws) as s:
        runs = s.runs().sort_values("id")
    params = [json.loads(p) for p in runs["params_json"]]
    assert len(params) == 2  # separate runs: runs are keyed by their parameters
    assert (params[0]["seq_len"], params[0]["n_prompts"], params[0]["batch_size"]) == (4, 2, 1)
    assert (params[1]["seq_len"], params[1]["n_prompts"]) == (_Probe.params[0].default, 1)


def test_scan_checks_scan_params_before_loading(
    probes: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "ws"
    code, _, err = run_cli(capsys, ["scan", "-d", f"{_Probe.name},{_BadProbe.name}", "-m", NO_MODEL, "-w", str(ws)])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0
    assert len(lines) == 1, err  # one line: no "loading ..." before it
    assert lines[0].startswith("error: "), err
    assert "seq_len" in lines[0], err
    assert NO_MODEL not in lines[0], err
    assert not ws.exists(), "the store was opened before the scan parameters were checked"


def test_a_detector_the_model_cannot_feed_is_skipped_and_the_scan_goes_on(
    probes: None, tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny random model knows none of the shipped facts: the scan's causal trace cannot run
    on it, and the detectors after it must still run."""
    ws = tmp_path / "ws"
    code, out, err = run_cli(capsys, ["scan", "-d", f"causal-trace,{_Probe.name}", "-m", str(tiny_folder),
                                   "-w", str(ws)])
    assert code != 0, err
    assert err.splitlines()[-1] == "error: 1 of 2 detectors skipped (causal-trace): see above", err
    assert "skipped: causal-trace: " in err, err
    assert "knows none of the" in err, err
    head, *rows = out.rstrip("\n").splitlines()[-5:-2]
    assert head.endswith("done: 1 detector, 1 skipped"), out
    assert rows[0].split()[:2] == [_Probe.name, "run"], out
    assert rows[1].split()[:2] == ["causal-trace", "skipped:"], out
    with Store(ws) as s:
        assert list(s.runs()["detector"]) == [_Probe.name]


# -- the rendered pages -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scanned_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with one finished run of every default-scan detector (a metrics row each:
    the pages' run lists are what is checked here, not the detectors' tables)."""
    path = tmp_path_factory.mktemp("scan-ws")
    with Store(path) as s:
        for name in default_scan():
            cls = all_detectors()[name]
            run = s.start_run(model="toy", model_hash=None, detector=name, variant="v",
                              params=cls.parse_params(cls.scan_params).to_dict(), dataset_hash=None, seed=None,
                              code_version=None, provenance={"source": "object"})
            metrics = pd.DataFrame({"name": ["n"], "value": [1.0], "ci_low": [None], "ci_high": [None], "n": [1]})
            run.commit_unit("final", UnitResult({"metrics": metrics}), 0.0)
            run.finish("done")
    return path


def _app(page: str) -> Any:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP / page), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_after_the_default_scan_every_page_lists_its_runs(
    scanned_ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTERP_WORKSPACE", str(scanned_ws))
    scan = default_scan()
    for name, (file, key) in PAGE_FILES.items():
        at = _app(file)
        options = [str(o) for o in at.selectbox(key=key).options]
        # Run labels read "#id detector · model · status"; Compare lists the detectors.
        listed = sorted(options if name == "Compare" else [o.split(" ")[1] for o in options])
        want = sorted(d for d in routing.PAGES[name].detectors(_routes()) if d in scan)
        assert listed == want, f"{name}: lists {listed}, declares {want}"
        assert want
        if name == "Compare":
            # One run each: it opens on a head detector, whose run shows charts, not only metrics.
            assert _routes()[at.selectbox(key=key).value].output == "head_scores"


def test_home_says_what_each_page_shows_and_what_fills_it(
    scanned_ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTERP_WORKSPACE", str(scanned_ws))
    at = _app("Home.py")
    text = "\n".join(str(c.value) for c in at.caption)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("**")]
    # Circuits and the Atlas are filled by their own commands, not by the scan.
    assert [ln.split("**")[1] for ln in lines] == [*routing.PAGES, "Circuits", "Atlas"]
    for line in lines[:-2]:
        assert "`interp scan` (" in line, line
    # The atlas page reads what `interp atlas` writes, not the runs of a scan.
    assert "`interp atlas`" in lines[-1]
    assert "`interp run path-patching`" in lines[-2]
    trace = next(ln for ln in lines if ln.startswith("**Causal tracing**"))
    params = all_detectors()["causal-trace"].scan_params
    assert all(f"{k} {v}" in trace for k, v in params.items()), trace
