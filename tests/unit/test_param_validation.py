"""Parameters are checked before any model is loaded or any run is opened (issue 18, point 2).

Every detector's numeric parameters are swept with values just outside their declared ranges,
and a table of violated relations between parameters is run through the CLI, in-process. The
model given is a path that cannot load and, for a sample, a tiny model folder that does load:
if validation came after loading, the first would fail on the model instead of the parameter,
and the second would create the workspace (the store is opened before the model is loaded).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from interp.errors import UserError
from interp.runs.config import DetectorConfig, Param, param
from interp.runs.registry import Detector, all_detectors
from tests.tiny import run_cli

NO_MODEL = "/nonexistent/model"
DETECTORS = all_detectors()
# Options of ``interp run`` itself: a detector parameter of the same name could not be given on
# the command line (test_no_parameter_is_shadowed_by_a_run_option keeps it so).
RUN_OPTIONS = {"model", "workspace", "backend", "top", "fresh", "json", "prefix", "verbose"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _num(x: float, kind: type) -> str:
    return str(int(x)) if kind is int else repr(float(x))


def out_of_range(p: Param) -> list[str]:
    """Raw CLI values just outside the declared range of p (of one item, for a list), plus
    values of the wrong kind."""
    kind = p.item or p.type
    bad: list[str] = []
    if p.low is not None:
        if kind is int:
            bad.append(_num(p.low if p.low_open else p.low - 1, int))
        else:
            bad.append(_num(p.low if p.low_open else math.nextafter(p.low, -math.inf), float))
    if p.high is not None:
        if kind is int:
            bad.append(_num(p.high if p.high_open else p.high + 1, int))
        else:
            bad.append(_num(p.high if p.high_open else math.nextafter(p.high, math.inf), float))
    bad += ["1.5", "ten"] if kind is int else ["nan", "inf", "ten"]
    return bad


SWEEP = [
    pytest.param(name, p.name, raw, id=f"{name}-{p.name}={raw}")
    for name, det in DETECTORS.items()
    for p in det.params
    if p.numeric
    for raw in out_of_range(p)
]

# (detector, raw parameters that violate a relation or a list/file parameter, text the error names)
RELATIONS: list[tuple[str, dict[str, str], str]] = [
    ("causal-trace", {"prompt": "The capital of France is"}, "--subject"),
    ("causal-trace", {"prompt": "The capital of France is", "subject": "Germany", "answer": "Paris"}, "subject"),
    ("causal-trace", {"kinds": "state,heads"}, "kinds"),
    ("causal-trace", {"kinds": ","}, "kinds"),
    ("causal-trace", {"facts": "/nonexistent/facts.jsonl"}, "fact file"),
    ("attention-knockout", {"subject": "France", "answer": "Paris"}, "--prompt"),
    ("attention-knockout", {"facts": "/nonexistent/facts.csv"}, "fact file"),
    ("cmr", {"max_lag": "8", "seq_len": "9"}, "seq_len"),
    ("cmr", {"max_lag": "4", "fit_lag": "5"}, "fit_lag"),
    ("cmr", {"null_draws": "10"}, "null_draws"),
    ("cmr", {"null_draws": "50", "null_alpha": "0.01"}, "null_draws"),
    ("lag-crp", {"max_lag": "8", "seq_len": "9"}, "seq_len"),
    ("lag-crp", {"lists": "repeated", "max_lag": "49"}, "seq_len"),
    ("lag-crp", {"variant": "repeated", "lists": "mistry"}, "former name"),
    ("episodic-ablation", {"early": "60", "late": "50"}, "early"),
    ("episodic-ablation", {"late": "511", "seq_len": "512"}, "late"),
    ("episodic-ablation", {"window": "52", "early": "50"}, "window"),
    ("episodic-ablation", {"k": "2", "n_single": "3"}, "n_single"),
    ("episodic-ablation", {"cum_sizes": "1,x"}, "cum_sizes"),
    ("episodic-ablation", {"cum_sizes": "0,2"}, "cum_sizes"),
    ("conflict-heads", {"formats": "restated,story"}, "format"),
    ("conflict-heads", {"formats": ","}, "format"),
    ("ph3", {"formats": "story"}, "format"),
    ("ph3", {"ks": "0,3"}, "ks"),
    ("ph3", {"ks": "1,three"}, "ks"),
    ("ph3", {"factors": "0,nan"}, "factors"),
    ("ph3", {"factors": "0,half"}, "factors"),
    ("decore-eval", {"ks": "0,1"}, "ks"),
    ("decore-eval", {"tasks": "nqswap,trivia"}, "task"),
    ("decore-eval", {"heads": "1.2,3"}, "heads"),
    ("decore-eval", {"heads": "0.1,0.2", "ks": "1,3"}, "heads"),
    ("decore-eval", {"heads": "0.1,0.1", "ks": "1"}, "listed twice"),
    ("retrieval", {"min_length": "500", "max_length": "400"}, "min_length"),
    ("retrieval", {"max_length": "1000", "max_new_tokens": "100", "max_tokens": "1024"}, "max_tokens"),
    ("retrieval", {"needles_file": "/nonexistent/needles.jsonl"}, "needles file"),
    ("retrieval", {"haystack_file": "/nonexistent/haystack.txt"}, "haystack file"),
    ("retrieval-masking", {"heads": "0.1", "top_k": "2"}, "heads"),
    ("retrieval-masking", {"heads": "0-1"}, "heads"),
    ("retrieval-masking", {"min_length": "900"}, "min_length"),
]

# Plugin commands: (argv, text the error names). Each would load the model after its checks.
COMMANDS: list[tuple[list[str], str]] = [
    (["decore", "-p", "hi", "--k", "3", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["decore", "-p", "hi", "--k", "-1"], "--k"),
    (["decore", "-p", "hi", "--heads", "1.2", "--k", "3"], "--heads"),
    (["decore", "-p", "hi", "--heads", "1-2"], "heads"),
    (["decore", "-p", "hi", "--k", "3", "--alpha", "-0.5"], "alpha"),
    (["decore", "-p", "hi", "--k", "3", "--alpha", "nan"], "alpha"),
    (["decore", "-p", "hi", "--k", "3", "--alpha-cap", "-1"], "alpha_cap"),
    (["decore", "-p", "hi", "--k", "3", "--method", "mean"], "method"),
    (["decore", "-p", "hi", "--k", "3", "--prefill", "none"], "prefill"),
    (["decore", "-p", "hi", "--k", "3", "--ranking-mode", "slow"], "--ranking-mode"),
    (["decore", "--k", "3"], "--prompt"),
    # One rule for empty prompts in both commands (issue 27): refused before the model (and a ranking).
    (["decore", "-p", "", "--k", "3"], "--prompt is empty"),
    (["decore", "-p", "an apple", "-p", "  ", "--k", "3"], "--prompt (number 2) is empty"),
    (["prune", "--heads", "1.2", "--prompt", ""], "--prompt is empty"),
    (["prune", "--heads", "1.2", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["prune", "--heads", "x", "--prompt", "hi"], "head"),
    (["prune", "--heads", "1.2", "--prompt", " "], "--prompt is empty"),
]


def _assert_rejected(code: int, stderr: str, names: str, workspace: Path | None) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code != 0
    assert len(lines) == 1, stderr  # one line: no "loading ..." before it, no traceback
    assert lines[0].startswith("error: "), stderr
    assert names in lines[0], stderr
    assert "no such folder" not in lines[0], stderr  # about the parameter, not the model
    assert NO_MODEL not in lines[0], stderr
    if workspace is not None:
        assert not workspace.exists(), "the store was opened before the parameters were checked"


@pytest.mark.slow  # every bad value of every parameter: the full suite (range edges stay in the loop)
@pytest.mark.parametrize(("detector", "name", "raw"), SWEEP)
def test_out_of_range_value_fails_before_loading(
    detector: str, name: str, raw: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "ws"
    code, _, err = run_cli(capsys, ["run", detector, f"{_flag(name)}={raw}", "-m", NO_MODEL, "-w", str(ws)])
    _assert_rejected(code, err, f"parameter '{name}", ws)


def test_no_parameter_is_shadowed_by_a_run_option() -> None:
    """``interp run DET --top 5`` is the table option: a detector parameter called ``top`` could
    never be set from the command line."""
    shadowed = [f"{n}.{p.name}" for n, det in DETECTORS.items() for p in det.params if p.name in RUN_OPTIONS]
    assert not shadowed, f"rename these parameters: {shadowed}"


@pytest.mark.parametrize(("detector", "raw", "names"), RELATIONS, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_violated_relation_fails_before_loading(
    detector: str, raw: dict[str, str], names: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "ws"
    args = [f"{_flag(k)}={v}" for k, v in raw.items()]
    code, _, err = run_cli(capsys, ["run", detector, *args, "-m", NO_MODEL, "-w", str(ws)])
    _assert_rejected(code, err, names, ws)


@pytest.mark.parametrize(("argv", "names"), COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_plugin_command_options_fail_before_loading(
    argv: list[str], names: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, [*argv, "-m", NO_MODEL])
    _assert_rejected(code, err, names, None)


@pytest.mark.parametrize(
    ("detector", "flag", "raw", "names"),
    [
        ("ph3", "--val-fraction", "1.5", "parameter 'val_fraction' must be in (0, 1), got 1.5"),
        ("conflict-heads", "--val-fraction", "0", "parameter 'val_fraction' must be in (0, 1), got 0.0"),
        ("causal-trace", "--samples", "0", "parameter 'samples' must be >= 1, got 0"),
        ("retrieval", "--max-tokens", "100", "max_length + max_new_tokens must be <= max_tokens"),
    ],
)
def test_a_model_that_loads_is_not_loaded(
    detector: str, flag: str, raw: str, names: str, tiny_folder: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ws = tmp_path / "ws"
    code, _, err = run_cli(capsys, ["run", detector, flag, raw, "-m", str(tiny_folder), "-w", str(ws)])
    _assert_rejected(code, err, names, ws)


def test_the_tiny_folder_does_load_and_run(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The control for the test above: with valid parameters the same folder loads and a run is stored."""
    ws = tmp_path / "ws"
    code, _, err = run_cli(
        capsys,
        ["run", "induction", "--seq-len", "4", "--n-prompts", "1", "--batch-size", "1",
         "-m", str(tiny_folder), "-w", str(ws), "--json"],
    )
    assert code == 0, err
    assert (ws / "results.db").exists()


def test_scan_checks_every_detector_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    code, _, err = run_cli(capsys, ["scan", "-d", "induction,no-such-detector", "-m", NO_MODEL, "-w", str(ws)])
    _assert_rejected(code, err, "no-such-detector", ws)


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_defaults_pass_every_check(detector: str) -> None:
    """What ``interp run`` runs without parameters (the defaults) passes the ranges and the relations
    (``interp scan``'s scan parameters: tests/unit/test_default_scan.py)."""
    cfg = DETECTORS[detector].parse_params({})
    assert cfg.to_dict() == {p.name: list(p.default) if p.item else p.default for p in DETECTORS[detector].params}


def test_every_numeric_parameter_declares_its_range() -> None:
    """A new int/float parameter must say what range it takes, or that it takes any value."""
    undeclared = [
        f"{name}.{p.name}"
        for name, det in DETECTORS.items()
        for p in det.params
        if p.numeric and not p.bounded and not p.unbounded
    ]
    assert not undeclared, f"declare low/high or unbounded=True on: {', '.join(undeclared)}"
    for name, det in DETECTORS.items():
        for p in det.params:
            if p.bounded:
                assert p.numeric, f"{name}.{p.name}: a range on a {p.type_name} parameter"
                defaults = p.default if p.item else (p.default,)
                assert all(p.in_range(d) for d in defaults), f"{name}.{p.name}: default {p.default!r} outside {p.range_text()}"


def test_range_edges_are_accepted_and_messages_name_the_range() -> None:
    p = Param("x", float, 0.5, "", low=0, high=1, low_open=True, high_open=True)
    assert p.parse("0.999") == 0.999
    for raw, text in [("1", "in (0, 1), got 1.0"), ("0", "in (0, 1), got 0.0"), ("nan", "finite")]:
        with pytest.raises(UserError, match=r"parameter 'x' must be") as exc:
            p.parse(raw)
        assert text in str(exc.value)
    q = Param("n", int, 1, "", low=1)
    assert q.parse("1") == 1
    assert q.parse(3.0) == 3  # a JSON number that is an integer
    for raw in ("0", "1.5", 2.5):
        with pytest.raises(UserError, match=r"parameter 'n'"):
            q.parse(raw)
    assert Param("s", int, 0, "", low=0, high=10).range_text() == "in [0, 10]"
    assert Param("f", float, 1.0, "", low=0, low_open=True).range_text() == "> 0"


@dataclass(frozen=True)
class _RelationConfig(DetectorConfig):
    lo: int = param(1, "", low=0)
    hi: int = param(2, "", low=0)
    ks: tuple[int, ...] = param((1, 3), "", low=1)

    def check(self) -> None:
        if self.lo > self.hi:
            raise UserError("lo must be <= hi")


class _Relation(Detector[_RelationConfig]):
    name = "relation-test"
    Config = _RelationConfig


def test_parse_params_runs_the_config_check() -> None:
    cfg = _Relation.parse_params({"lo": "2", "hi": "3", "ks": "2, 5"})
    assert (cfg.lo, cfg.hi, cfg.ks) == (2, 3, (2, 5))
    assert cfg.to_dict() == {"lo": 2, "hi": 3, "ks": [2, 5]}
    assert _Relation.parse_params(cfg) is cfg
    assert _Relation.parse_params({"ks": [4]}).ks == (4,)  # a JSON list, as stored
    with pytest.raises(UserError, match="lo must be <= hi"):
        _Relation.parse_params({"lo": "3"})
    with pytest.raises(UserError, match=r"parameter 'ks\[1\]' must be >= 1, got 0"):
        _Relation.parse_params({"ks": "2,0"})
    with pytest.raises(UserError, match=r"unknown parameter 'k' for 'relation-test'"):
        _Relation.parse_params({"k": "2"})
    with pytest.raises(Exception, match="cannot assign"):
        cfg.lo = 5  # type: ignore[misc]  # frozen: a run's config cannot drift after its key is made


SLUG = re.compile(r"^[a-z0-9]+([-./+=][a-z0-9]+)*$")


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_the_variant_is_a_short_slug_and_its_prose_is_apart(detector: str) -> None:
    """The variant is part of the run key: a short slug that rewording cannot change; the
    sentence that explains it is method_text, stored as the run's settings artifact."""
    det = DETECTORS[detector]()
    for raw in ({}, DETECTORS[detector].scan_params):
        cfg = det.parse_params(raw)
        slug = det.variant(cfg)
        assert SLUG.match(slug), slug
        assert len(slug) <= 40, slug
        assert len(det.method_text(cfg)) > len(slug)


def test_a_renamed_parameter_is_read_under_its_former_name() -> None:
    """lag-crp's ``lists`` was ``variant`` (runs stored then still parse, and resume)."""
    lag = DETECTORS["lag-crp"]
    assert lag.parse_params({"variant": "repeated"}) == lag.parse_params({"lists": "repeated"})
    assert "variant" not in {p.name for p in lag.params}


def test_the_form_and_the_cli_come_from_the_config_fields() -> None:
    assert [(p.name, p.type_name, p.default) for p in _Relation.params] == [
        ("lo", "int", 1), ("hi", "int", 2), ("ks", "list of int", (1, 3))]
    assert _Relation.params[2].format((1, 3)) == "1,3"


def test_dashboard_form_rejects_a_bad_value_without_starting_a_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("INTERP_WORKSPACE", str(tmp_path))
    app = Path(__file__).resolve().parents[2] / "app" / "Home.py"
    at = AppTest.from_file(str(app), default_timeout=120).run()
    at.selectbox(key="start-detector").set_value("ph3").run()
    at.number_input(key="param-ph3-val_fraction").set_value(1.5)
    at.button[-1].click().run()  # the form's submit button is the last button
    assert not at.exception, [e.value for e in at.exception]
    assert any("parameter 'val_fraction' must be in (0, 1)" in e.value for e in at.error)
    jobs_dir = tmp_path / "jobs"
    assert not (jobs_dir.exists() and list(jobs_dir.glob("*.json"))), "a job was started"
