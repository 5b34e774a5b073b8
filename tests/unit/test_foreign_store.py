"""What a results.db is, decided before anything is written (issue 27): a SQLite file of another
tool (several schemas), a file that is no SQLite at all, or a workbench store.

A foreign file is refused in one line by every command, readers (runs, export, app) and writers
(run, scan) alike, and its folder is byte for byte as it was: the same files, the same bytes, no
journal beside it. Readers open read-only, so a store on a read-only file and folder is listed
and exported. Stores written before the marker (tests/data/store_v0_1, and today's store with
its marker cleared) still open, read-only without a write, and resume once a writer stamps them.
The header is read here by hand (bytes 60 and 68, big-endian), not through the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from interp.runs.schema import SCHEMA_VERSION
from interp.runs.store import DB_NAME, Store
from tests.tiny import run_cli

REPO = Path(__file__).resolve().parents[2]
# The workbench's SQLite application id: "iwbk" (interp/runs/store_file.py), spelled out here.
APPLICATION_ID = int.from_bytes(b"iwbk", "big")
OLD = REPO / "tests" / "data" / "store_v0_1"


def _sql(*statements: str, wal: bool = False) -> Callable[[Path], None]:
    def make(db: Path) -> None:
        con = sqlite3.connect(db)
        if wal:
            con.execute("PRAGMA journal_mode = WAL")
        for stmt in statements:
            con.execute(stmt)
        con.commit()
        con.close()

    return make


def _bytes(content: bytes) -> Callable[[Path], None]:
    return lambda db: db.write_bytes(content)


# Each: how to make a results.db that is not a workbench store, and a word its refusal says.
FOREIGN: dict[str, tuple[Callable[[Path], None], str]] = {
    "another tool's tables": (_sql("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
                                   "CREATE INDEX idx_users ON users (name)", "INSERT INTO users VALUES (1, 'ada')"),
                              "other tables (users)"),
    "our table names, other columns": (_sql("CREATE TABLE runs (id INTEGER, name TEXT)", "CREATE TABLE units (x)",
                                            "CREATE TABLE schema_version (version INTEGER)"), "other tables"),
    "our schema plus a table of its own": (_sql(
        "CREATE TABLE schema_version (version INTEGER NOT NULL)",
        "CREATE TABLE runs (id INTEGER PRIMARY KEY, key TEXT, model TEXT, detector TEXT, variant TEXT, "
        "params_json TEXT, status TEXT)",
        "CREATE TABLE units (run_id INTEGER, unit TEXT, finished_at TEXT)",
        "CREATE TABLE invoices (n INTEGER)"), "invoices"),
    "a WAL-mode database": (_sql("CREATE TABLE events (t REAL, what TEXT)", "INSERT INTO events VALUES (1.5, 'x')",
                                 wal=True), "other tables (events)"),
    "an empty SQLite database": (_sql("PRAGMA user_version = 7"), "empty SQLite database"),
    "another application id": (_sql("PRAGMA application_id = 1196444487", "CREATE TABLE runs (id INTEGER)",
                                    "CREATE TABLE units (run_id INTEGER)"), "application id is 0x47504b47"),
    "a text file": (_bytes(b"name,score\nada,1\n" * 20), "not a SQLite database"),
    "a truncated SQLite header": (_bytes(b"SQLite format 3\x00\x10\x00"), "not a SQLite database"),
}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file of the folder and its sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _header_ints(db: Path) -> tuple[int, int]:
    """(user_version, application_id) read from the SQLite header by hand."""
    head = db.read_bytes()[:100]
    return int.from_bytes(head[60:64], "big"), int.from_bytes(head[68:72], "big")


def _marker(db: Path) -> tuple[int, int]:
    """(user_version, application_id) as SQLite reads them (through the WAL, unlike the header)."""
    con = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return int(con.execute("PRAGMA user_version").fetchone()[0]), int(con.execute("PRAGMA application_id").fetchone()[0])
    finally:
        con.close()


def _app(ws: Path) -> subprocess.CompletedProcess[str]:
    """``interp app`` in a child process: on a store it accepts it would exec the server."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "interp.cli", "app", "--port", "8597", "-w", str(ws)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.fixture(params=list(FOREIGN), ids=list(FOREIGN))
def foreign(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    ws = tmp_path / "ws"
    ws.mkdir()
    make, says = FOREIGN[request.param]
    make(ws / DB_NAME)
    return ws, says


@pytest.mark.subprocess
def test_a_foreign_file_is_refused_by_every_command_and_left_as_it_was(
    foreign: tuple[Path, str], tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws, says = foreign
    before = _snapshot(ws)
    commands = [["runs"], ["runs", "--json"], ["export", "--out", str(tmp_path / "out")],
                ["export", "1", "--format", "parquet", "--out", str(tmp_path / "out")],
                ["run", "induction", "-m", str(tiny_folder), "--seq-len", "8", "--n-prompts", "2"],
                ["scan", "-m", str(tiny_folder), "-d", "copying"]]
    for args in commands:
        code, out, err = run_cli(capsys, [*args, "-w", str(ws)])
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code != 0, (args, err)
        assert len(lines) == 1, (args, err)
        assert lines[0].startswith(f"error: {ws / DB_NAME} is not an interp-workbench results store"), (args, err)
        assert says in lines[0], (args, err)
        assert out == "", args
        assert _snapshot(ws) == before, f"{args} changed the folder"
    proc = _app(ws)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "is not an interp-workbench results store" in proc.stderr
    assert _snapshot(ws) == before, "interp app changed the folder"
    assert not (tmp_path / "out").exists()


def test_a_new_store_carries_the_marker_from_its_first_write(tmp_path: Path) -> None:
    with Store(tmp_path / "ws") as s:
        assert s.runs().empty
    user_version, app_id = _header_ints(tmp_path / "ws" / DB_NAME)
    assert app_id == APPLICATION_ID
    assert user_version == SCHEMA_VERSION


def _one_run(store: Store, status: str = "done") -> int:
    run = store.start_run(model="m", model_hash=None, detector="d", variant="v", params={"n": 1},
                          dataset_hash=None, seed=0, code_version=None, provenance={})
    if status != "running":
        run.finish(status)
    return run.id


@contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """The folder and its files read-only for this process: chmod, or for root (whom modes do
    not stop) the immutable attribute. Skips where neither holds."""
    paths = [folder, *folder.iterdir()]
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", *map(str, paths)],
                                                            capture_output=True, check=False).returncode:
            pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
        undo = ["chattr", "-i", *map(str, paths)]
    else:
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)
        undo = []
    try:
        try:
            (folder / "probe").touch()
        except OSError:
            pass
        else:
            pytest.skip("the folder stayed writable")
        yield
    finally:
        if undo:
            subprocess.run(undo, check=True)
        else:
            for p, mode in modes.items():
                p.chmod(mode)


def test_a_store_on_a_read_only_folder_is_listed_and_exported(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "ws"
    with Store(ws) as s:
        run_id = _one_run(s)
    before = _snapshot(ws)
    with _read_only(ws):
        code, out, err = run_cli(capsys, ["runs", "--json", "-w", str(ws)])
        assert code == 0, err
        assert [r["id"] for r in json.loads(out)["runs"]] == [run_id]
        code, out, err = run_cli(capsys, ["export", "-w", str(ws), "--out", str(tmp_path / "out")])
        assert code == 0, err
        assert (tmp_path / "out" / "runs.csv").is_file()
        # A writer says so in one line.
        code, _, err = run_cli(capsys, ["run", "induction", "-m", str(tiny_folder), "-w", str(ws)])
        assert code != 0
        assert err.count("\n") == 1, err
        assert "is not writable" in err
    assert _snapshot(ws) == before


def test_stores_written_before_the_marker_open_read_only_untouched_then_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The store of version 0.1 and one of today's with its marker cleared: both unmarked.
    old = tmp_path / "old"
    shutil.copytree(OLD, old)
    cleared = tmp_path / "cleared"
    with Store(cleared) as s:
        unfinished = _one_run(s, "interrupted")
    con = sqlite3.connect(cleared / DB_NAME)
    con.execute("PRAGMA application_id = 0")
    con.execute("PRAGMA user_version = 0")
    con.commit()
    con.close()
    for ws in (old, cleared):
        assert _header_ints(ws / DB_NAME) == (0, 0)
        before = _snapshot(ws)[DB_NAME]
        code, out, err = run_cli(capsys, ["runs", "--json", "-w", str(ws)])
        assert code == 0, err
        assert len(json.loads(out)["runs"]) == 1
        # (A WAL store read in a writable folder gets SQLite's -shm and -wal files beside it: they let
        # a reader see a concurrent writer's commits; the store itself is not written.)
        assert _snapshot(ws)[DB_NAME] == before, "a reader wrote to a store"
        # A writer recognises it by its schema, stamps it and resumes its run.
        with Store(ws) as s:
            [row] = s.runs().to_dict("records")
            assert row["status"] == "interrupted"
        assert _marker(ws / DB_NAME) == (SCHEMA_VERSION, APPLICATION_ID)
    with Store(cleared) as s:
        run = s.start_run(model="m", model_hash=None, detector="d", variant="v", params={"n": 1},
                          dataset_hash=None, seed=0, code_version=None, provenance={})
    assert run.resumed
    assert run.id == unfinished


LONG = "w" * 300  # longer than any file name ext4, xfs or tmpfs allow (255 bytes)


@pytest.mark.parametrize(
    "args",
    [["runs"], ["export"], ["run", "induction", "--seq-len", "8"], ["scan", "-d", "copying"],
     ["atlas", "-d", "induction"]],
    ids=["runs", "export", "run", "scan", "atlas"],
)
def test_a_workspace_name_too_long_for_the_file_system_is_one_line(
    args: list[str], tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = ["--models" if args[0] == "atlas" else "-m", str(tiny_folder)] if args[0] in ("run", "scan", "atlas") else []
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, [*args, *model, "-w", LONG])
    assert code != 0
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("error: ")
    assert "too long for the file system" in err
    assert list(tmp_path.iterdir()) == []


def test_a_model_name_too_long_for_the_file_system_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["run", "induction", "-m", f"./{LONG}"], ["atlas", "--models", f"./{LONG}", "-d", "induction"]):
        code, _, err = run_cli(capsys, [*args, "-w", str(tmp_path / "ws")])
        assert code != 0
        assert err.count("\n") == 1, err
        assert "too long for the file system" in err
        assert not (tmp_path / "ws").exists()
