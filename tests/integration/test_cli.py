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

from interp.runs.store import RESERVED_UNITS

pytestmark = pytest.mark.integration

INTERP = [sys.executable, "-m", "interp.cli"]


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
    t0 = time.perf_counter()
    proc = _cli("run", "induction", "--model", "someorg/somemodel", "--workspace", str(tmp_path),
                env={"HF_HUB_OFFLINE": "1"})
    line = _one_line_error(proc)
    assert "hub" in line.lower()
    assert time.perf_counter() - t0 < 60  # generous: interpreter start-up dominates


def test_unwritable_workspace(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _cli("run", "induction", "--workspace", str(blocker / "ws"))
    assert "not writable" in _one_line_error(proc)


def _committed_units(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            # The detector's own units (the runner also writes settings, final and warnings).
            marks = ",".join("?" * len(RESERVED_UNITS))
            return con.execute(f"select count(*) from units where unit not in ({marks})", RESERVED_UNITS).fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


def test_kill_and_resume_loses_nothing(smol: object, tmp_path: Path) -> None:
    args = ["run", "induction", "--json", "--n-prompts", "24", "--batch-size", "2", "--seq-len", "30"]
    ws = tmp_path / "killed"
    proc = subprocess.Popen([*INTERP, *args, "--workspace", str(ws)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    db = ws / "results.db"
    deadline = time.time() + 300
    while _committed_units(db) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _committed_units(db)
    assert 3 <= killed_at < 12, f"kill landed after {killed_at} of 12 units"

    resumed = _cli(*args, "--workspace", str(ws))
    assert resumed.returncode == 0, resumed.stderr
    r = json.loads(resumed.stdout)
    assert r["units_resumed"] == killed_at
    assert r["units_computed"] == 12 - killed_at

    fresh = _cli(*args, "--workspace", str(tmp_path / "fresh"))
    f = json.loads(fresh.stdout)
    assert f["units_computed"] == 12
    a = {(h["layer"], h["head"]): h["score"] for h in r["heads"]}
    b = {(h["layer"], h["head"]): h["score"] for h in f["heads"]}
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) < 1e-9
    con = sqlite3.connect(db)
    assert con.execute("pragma integrity_check").fetchone()[0] == "ok"


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
