"""The `interp` CLI end to end on the zoo default: JSON output, bad input, kill -9 and resume."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from interp.runs.schema import RESERVED_UNITS

pytestmark = pytest.mark.integration

INTERP = [sys.executable, "-m", "interp.cli"]
REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*INTERP, *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines, "no error message"
    assert lines[-1].startswith("error:"), proc.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ws")


def test_run_induction_json(smol: object, workspace: Path) -> None:
    proc = _cli("run", "induction", "--json", "--workspace", str(workspace))
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, "stdout must hold exactly one JSON object"
    obj = json.loads(lines[0])
    heads = obj["heads"]
    assert len(heads) == 30 * 9
    scores = [h["score"] for h in heads]
    assert scores == sorted(scores, reverse=True)
    assert {"layer", "head", "score"} <= set(heads[0])
    assert sum(s > 0.4 for s in scores) >= 5
    # The same run again resumes the finished run's key as a new run with identical numbers.
    runs = _cli("runs", "--json", "--workspace", str(workspace))
    assert runs.returncode == 0
    stored = json.loads(runs.stdout)["runs"]
    assert any(r["detector"] == "induction" and r["status"] == "done" for r in stored)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "induction", "--model", "no-such-model"], "smollm2-135m"),
        (["run", "no-such-detector"], "unknown detector"),
        (["run", "induction", "--bogus", "1"], "unknown parameter"),
        (["run", "induction", "--seq-len", "abc"], "expects int"),
        (["run", "induction", "--seq-len", "5000"], "longer than"),
        (["export", "--format", "xls"], "xls"),
    ],
)
def test_bad_input_gives_one_line_error(args: list[str], needle: str, tmp_path: Path) -> None:
    proc = _cli(*args, "--workspace", str(tmp_path / "ws"))
    line = _one_line_error(proc)
    assert needle in line


def test_hub_id_offline_fails_fast(tmp_path: Path) -> None:
    # Offline, the hub is not tried at all (interp.model.loading.hub_reachable); the timeout only
    # guards against a hang, it is no bound that is tested.
    proc = _cli("run", "induction", "--model", "someorg/somemodel", "--workspace", str(tmp_path),
                env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    line = _one_line_error(proc)
    assert "cannot reach the hugging face hub" in line.lower()


def test_unwritable_workspace(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _cli("run", "induction", "--workspace", str(blocker / "ws"))
    assert "not writable" in _one_line_error(proc)


def _committed_units(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        # The detector's own units (the runner also writes settings, final and warnings).
        marks = ",".join("?" * len(RESERVED_UNITS))
        return con.execute(f"select count(*) from units where unit not in ({marks})", RESERVED_UNITS).fetchone()[0]
    finally:
        con.close()


@pytest.fixture(scope="module")
def gated_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/plugins/kill_gate.py installed as a package installs a plug-in (an entry point)."""
    site = tmp_path_factory.mktemp("site")
    dist = site / "gated_example-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gated-example\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[interp.plugins]\nkill-gate = tests.plugins.kill_gate\n")
    return site


def test_kill_and_resume_loses_nothing(smol: object, gated_site: Path, tmp_path: Path) -> None:
    """kill -9 while unit batch-5 computes: the five units before it are committed, that one is
    not, and the resumed run's numbers are a fresh run's. The kill lands on an event the run
    signals (the gated unit's file, written as it starts), not at a polled moment. Every process
    computes with one torch thread: the same layout, so the numbers agree bit for bit
    (tests/equality.py), whatever else runs on the machine."""
    from tests.equality import Layout, assert_values_equal

    env = {"PYTHONPATH": f"{gated_site}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    params = ["--n-prompts", "24", "--batch-size", "2", "--seq-len", "30"]
    gate = tmp_path / "gate"
    gate.mkdir()
    args = ["run", "gated-induction", "--json", *params, "--gate", str(gate), "--gate-unit", "batch-5"]
    ws = tmp_path / "killed"
    proc = subprocess.Popen([*INTERP, *args, "--workspace", str(ws)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    started = gate / "batch-5.started"
    while not started.exists() and proc.poll() is None:
        time.sleep(0.1)  # waiting for the event; the gated unit holds until it is killed
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert started.read_text() == str(proc.pid)
    db = ws / "results.db"
    assert _committed_units(db) == 5  # batch-0 .. batch-4: a serial run commits each before the next starts

    resumed = _cli(*args, "--workspace", str(ws), env=env)
    assert resumed.returncode == 0, resumed.stderr
    r = json.loads(resumed.stdout)
    assert (r["units_resumed"], r["units_computed"]) == (5, 7)

    fresh = _cli("run", "induction", "--json", *params, "--workspace", str(tmp_path / "fresh"), env=env)
    assert fresh.returncode == 0, fresh.stderr
    f = json.loads(fresh.stdout)
    assert f["units_computed"] == 12
    for field in ("score", "previous_token", "duplicate_token"):
        assert_values_equal({(h["layer"], h["head"]): h[field] for h in r["heads"]},
                            {(h["layer"], h["head"]): h[field] for h in f["heads"]}, Layout.SAME, field)
    assert_values_equal(r["metrics"], f["metrics"], Layout.SAME, "metric")
    con = sqlite3.connect(db)
    assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
    con.close()


def test_scan_ends_with_what_ran_and_where(smol: object, tmp_path: Path) -> None:
    ws = tmp_path / "scan ws"
    proc = _cli("scan", "-d", "induction", "--workspace", str(ws))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.rstrip("\n").splitlines()
    head, *rows, results, dashboard = lines[-4:]
    assert head == "scan of smollm2-135m done: 1 detector"
    [row] = rows
    assert row.split()[:3] == ["induction", "run", "1"]
    assert "4 units computed" in row
    assert "0 resumed" in row
    assert max(len(head), len(row)) <= 80
    assert results == f"results:   {ws.resolve() / 'results.db'}"
    command = dashboard.removeprefix("dashboard: ")
    assert shlex.split(command) == ["interp", "app", "--workspace", str(ws.resolve())]
    # The printed workspace is the one that holds the run.
    listed = _cli("runs", "--json", "--workspace", shlex.split(command)[-1])
    assert [r["id"] for r in json.loads(listed.stdout)["runs"]] == [1]
    # --json stays one object, now naming the workspace too.
    again = _cli("scan", "-d", "induction", "--workspace", str(ws), "--json")
    assert again.returncode == 0, again.stderr
    [line] = [ln for ln in again.stdout.splitlines() if ln.strip()]
    obj = json.loads(line)
    assert obj["workspace"] == str(ws.resolve())
    assert obj["detectors"]["induction"]["run_id"] == 2  # a finished run is not resumed: run again
