"""The results store: round trips, unit atomicity, resume, export, errors, crash safety."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from interp.errors import StoreError, UserError
from interp.runs.registry import UnitResult
from interp.runs.run_keys import code_version, run_key
from interp.runs.schema import SCHEMA_VERSION, TABLES
from interp.runs.store import Run, Store

REPO_ROOT = Path(__file__).resolve().parents[2]

RUN_ARGS: dict[str, Any] = {
    "model": "tiny",
    "model_hash": "abc123",
    "detector": "induction",
    "variant": "fast",
    "params": {"n": 8, "path": Path("/data/x.jsonl")},
    "dataset_hash": None,
    "seed": 0,
    "code_version": "0.1.0",
    "provenance": {"torch": "2.4"},
}


def all_tables(scale: float = 1.0) -> dict[str, pd.DataFrame]:
    return {
        "head_scores": pd.DataFrame(
            {
                "metric": ["score", "score"],
                "layer": [0, 1],
                "head": [2, 3],
                "value": [0.5 * scale, 0.25 * scale],
            }
        ),
        "token_layer": pd.DataFrame(
            {
                "kind": ["logit_lens"] * 2,
                "item": [0, 0],
                "token_index": [0, 1],
                "token": ["The", " cat"],
                "layer": [3, 3],
                "value": [1.5 * scale, -2.0 * scale],
            }
        ),
        "curves": pd.DataFrame(
            {
                "curve": ["loss", "loss"],
                "layer": [None, 2],
                "head": [None, 1],
                "x": [0.0, 1.0],
                "y": [3.0 * scale, 2.5 * scale],
                "ci_low": [None, 2.0 * scale],
                "ci_high": [None, 3.0 * scale],
                "n": [None, 4],
                "ci_method": [None, "t"],
            }
        ),
        "metrics": pd.DataFrame(
            {"name": ["acc"], "value": [0.9 * scale], "ci_low": [0.8], "ci_high": [0.95], "n": [100],
             "ci_method": ["wilson"]}
        ),
        "artifacts": pd.DataFrame({"name": ["cfg", "raw"], "json": [{"a": [1, 2]}, '{"b": 1}']}),
    }


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store(tmp_path / "ws") as s:
        yield s


def test_round_trip_every_table(store: Store) -> None:
    run = store.start_run(**RUN_ARGS)
    run.commit_unit("u0", UnitResult(all_tables()), duration_s=1.5)
    run.commit_unit("u1", UnitResult(all_tables(2.0)), duration_s=2.0)
    assert run.done_units() == {"u0", "u1"}

    hs = run.results("head_scores")
    assert list(hs.columns) == ["unit", "metric", "layer", "head", "value"]
    assert hs["unit"].tolist() == ["u0", "u0", "u1", "u1"]
    assert hs["layer"].tolist() == [0, 1, 0, 1]
    assert hs["head"].tolist() == [2, 3, 2, 3]
    assert hs["value"].tolist() == [0.5, 0.25, 1.0, 0.5]

    tl = run.to_frame("token_layer", unit="u1")
    assert tl["token"].tolist() == ["The", " cat"]
    assert tl["token_index"].tolist() == [0, 1]
    assert tl["item"].tolist() == [0, 0]
    assert tl["value"].tolist() == [3.0, -4.0]

    cv = run.to_frame("curves", unit="u0")
    assert pd.isna(cv["layer"].iloc[0])
    assert pd.isna(cv["head"].iloc[0])
    assert cv["layer"].iloc[1] == 2
    assert cv["head"].iloc[1] == 1
    assert cv["y"].tolist() == [3.0, 2.5]
    assert cv[["ci_low", "ci_high", "n", "ci_method"]].iloc[1].tolist() == [2.0, 3.0, 4, "t"]
    assert cv[["ci_low", "ci_high", "n", "ci_method"]].iloc[0].isna().all()

    mt = run.to_frame("metrics", unit="u0")
    assert mt.iloc[0].to_dict() == {
        "unit": "u0",
        "name": "acc",
        "value": 0.9,
        "ci_low": 0.8,
        "ci_high": 0.95,
        "n": 100,
        "ci_method": "wilson",
    }

    art = run.to_frame("artifacts", unit="u0")

    assert [json.loads(v) for v in art["json"]] == [{"a": [1, 2]}, {"b": 1}]

    assert set(run.all_results()) == set(TABLES)
    pd.testing.assert_frame_equal(store.to_frame(run.id, "metrics"), run.to_frame("metrics"))

    run.finish()
    runs = store.runs()
    assert runs.loc[0, "status"] == "done"
    assert runs.loc[0, "n_units"] == 2
    assert runs.loc[0, "duration_s"] >= 0
    info = run.info()
    assert info["params"] == {"n": 8, "path": "/data/x.jsonl"}
    assert info["provenance"] == {"torch": "2.4"}


def test_missing_optional_columns_are_null_and_bad_input_is_rejected(store: Store) -> None:
    run = store.start_run(**RUN_ARGS)
    run.commit_unit(
        "u", UnitResult({"head_scores": pd.DataFrame({"layer": [0], "head": [1], "value": [2.0]})}), 0.1
    )
    assert pd.isna(run.results("head_scores")["metric"].iloc[0])

    with pytest.raises(ValueError, match="unknown table"):
        run.commit_unit("v", UnitResult({"nope": pd.DataFrame({"a": [1]})}), 0.1)
    with pytest.raises(ValueError, match="unknown column"):
        run.commit_unit(
            "v", UnitResult({"metrics": pd.DataFrame({"name": ["a"], "value": [1], "zz": [1]})}), 0.1
        )
    with pytest.raises(ValueError, match="required"):
        run.commit_unit("v", UnitResult({"metrics": pd.DataFrame({"name": ["a"]})}), 0.1)
    with pytest.raises(ValueError, match="set by the store"):
        run.commit_unit(
            "v", UnitResult({"metrics": pd.DataFrame({"unit": ["x"], "name": ["a"], "value": [1]})}), 0.1
        )
    assert run.done_units() == {"u"}
    with pytest.raises(UserError, match="unknown table"):
        run.to_frame("nope")


def _rows_of_unit(store: Store, run: Run, unit: str) -> dict[str, int]:
    return {table: len(run.to_frame(table, unit=unit)) for table in TABLES}


def test_unit_is_atomic_on_failure_inside_the_transaction(store: Store) -> None:
    run = store.start_run(**RUN_ARGS)
    tables = all_tables()
    # The second table fails only while being written, after the first table's rows are in.
    tables["token_layer"] = tables["token_layer"].astype({"token": object})
    tables["token_layer"].loc[1, "token"] = object()
    bad = UnitResult(tables)
    with pytest.raises(ValueError, match="unsupported value"):
        run.commit_unit("u", bad, 0.1)
    assert run.done_units() == set()
    assert _rows_of_unit(store, run, "u") == dict.fromkeys(TABLES, 0)

    # A failed re-commit keeps the unit's previous version, whole.
    run.commit_unit("u", UnitResult(all_tables()), 0.1)
    before = _rows_of_unit(store, run, "u")
    with pytest.raises(ValueError, match="unsupported value"):
        run.commit_unit("u", bad, 0.1)
    assert _rows_of_unit(store, run, "u") == before
    assert run.to_frame("head_scores", unit="u")["value"].tolist() == [0.5, 0.25]


def test_unknown_column_in_second_table_writes_nothing(store: Store) -> None:
    run = store.start_run(**RUN_ARGS)
    tables = all_tables()
    tables["token_layer"] = tables["token_layer"].assign(bogus=1)
    with pytest.raises(ValueError, match="bogus"):
        run.commit_unit("u", UnitResult(tables), 0.1)
    assert run.done_units() == set()
    assert _rows_of_unit(store, run, "u") == dict.fromkeys(TABLES, 0)


def test_commit_twice_replaces_the_unit(store: Store) -> None:
    run = store.start_run(**RUN_ARGS)
    run.commit_unit("u", UnitResult(all_tables()), 0.1)
    run.commit_unit("u", UnitResult({"head_scores": all_tables(3.0)["head_scores"]}), 0.2)
    assert run.done_units() == {"u"}
    assert run.results("head_scores")["value"].tolist() == [1.5, 0.75]
    assert len(run.results("metrics")) == 0


def test_resume_returns_same_run_and_its_done_units(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        run = s.start_run(**RUN_ARGS)
        assert not run.resumed
        run.commit_unit("a", UnitResult(all_tables()), 0.1)
        run.commit_unit("b", UnitResult(all_tables()), 0.1)
        run.finish("interrupted", "interrupted")
    with Store(tmp_path) as s:
        again = s.start_run(**RUN_ARGS)
        assert again.resumed
        assert again.id == run.id
        assert again.key == run.key
        assert again.done_units() == {"a", "b"}
        assert again.status == "running"
        assert len(again.results("head_scores")) == 4
        # resume=False always starts afresh.
        fresh = s.start_run(**{**RUN_ARGS, "resume": False})
        assert fresh.id != run.id
        assert fresh.done_units() == set()


def test_done_run_is_not_resumed(store: Store) -> None:
    run = store.start_run(**RUN_ARGS)
    run.commit_unit("a", UnitResult(all_tables()), 0.1)
    run.finish()
    rerun = store.start_run(**RUN_ARGS)
    assert rerun.id != run.id
    assert rerun.key == run.key
    assert rerun.done_units() == set()
    found = store.find_run(run.key, status="done")
    assert found is not None
    assert found.id == run.id
    newest = store.find_run(run.key)
    assert newest is not None
    assert newest.id == rerun.id
    assert store.find_run("0" * 64) is None
    assert store.runs()["id"].tolist() == [rerun.id, run.id]


def test_run_key_depends_on_identity_not_provenance() -> None:
    base = {
        k: RUN_ARGS[k]
        for k in ("model", "model_hash", "detector", "variant", "params", "dataset_hash", "seed")
    }
    assert run_key(**base) == run_key(**{**base, "model": "renamed"})
    assert run_key(**base) != run_key(**{**base, "seed": 1})
    assert run_key(**base) != run_key(**{**base, "params": {"n": 9, "path": "/data/x.jsonl"}})
    assert run_key(**base) == run_key(**{**base, "params": {"path": "/data/x.jsonl", "n": 8}})
    with pytest.raises(UserError, match="JSON"):
        run_key(**{**base, "params": {"f": object()}})


def test_guard_marks_failed_and_interrupted(store: Store) -> None:
    run = store.start_run(**RUN_ARGS)
    with pytest.raises(RuntimeError), run.guard():
        raise RuntimeError("boom")
    info = run.info()
    assert info["status"] == "failed"
    assert info["error"] == "RuntimeError: boom"

    run2 = store.start_run(**RUN_ARGS)
    assert run2.id == run.id  # a failed run is resumed
    with pytest.raises(KeyboardInterrupt), run2.guard():
        raise KeyboardInterrupt
    assert run2.status == "interrupted"


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export(store: Store, tmp_path: Path, fmt: str) -> None:
    run = store.start_run(**RUN_ARGS)
    run.commit_unit("u0", UnitResult({k: v for k, v in all_tables().items() if k != "artifacts"}), 0.1)
    run.finish()
    other = store.start_run(**{**RUN_ARGS, "seed": 1})
    other.commit_unit("u0", UnitResult(all_tables()), 0.1)

    paths = store.export(run.id, tmp_path / "out", fmt=fmt)
    names = sorted(p.name for p in paths)
    expected = ["curves", "head_scores", "metrics", "runs", "token_layer"]
    assert names == sorted(f"{n}.{fmt}" for n in expected)
    assert all(p.exists() for p in paths)

    def read(path: Path) -> pd.DataFrame:
        return pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)

    hs = read(tmp_path / "out" / f"head_scores.{fmt}")
    assert list(hs.columns) == ["run_id", "unit", "metric", "layer", "head", "value"]
    assert hs["value"].tolist() == [0.5, 0.25]
    assert set(hs["run_id"]) == {run.id}
    runs = read(tmp_path / "out" / f"runs.{fmt}")
    assert runs["id"].tolist() == [run.id]

    everything = store.export(None, tmp_path / "all", fmt=fmt)
    assert f"artifacts.{fmt}" in {p.name for p in everything}
    assert sorted(read(tmp_path / "all" / f"runs.{fmt}")["id"].tolist()) == sorted([run.id, other.id])
    assert len(read(tmp_path / "all" / f"head_scores.{fmt}")) == 4


def test_export_errors(store: Store, tmp_path: Path) -> None:
    run = store.start_run(**RUN_ARGS)
    with pytest.raises(UserError, match="unknown export format"):
        store.export(run.id, tmp_path / "out", fmt="xlsx")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="no run with id 999"):
        store.export(999, tmp_path / "out")


def test_unknown_run_and_delete(store: Store) -> None:
    with pytest.raises(UserError, match="no run with id 42"):
        store.run(42)
    with pytest.raises(UserError, match="no run with id 42"):
        store.delete_run(42)
    run = store.start_run(**RUN_ARGS)
    run.commit_unit("u", UnitResult(all_tables()), 0.1)
    assert store.run(run.id).done_units() == {"u"}
    store.delete_run(run.id)
    assert len(store.runs()) == 0
    con = sqlite3.connect(store.path)
    try:
        for table in [*TABLES, "units"]:
            assert con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0
    finally:
        con.close()


def test_unwritable_workspace(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    # Tests run as root, which chmod does not stop: a regular file as a parent always blocks.
    with pytest.raises(StoreError, match="is not writable") as err:
        Store(blocker / "ws")
    assert "\n" not in str(err.value)
    assert str(blocker / "ws") in str(err.value)
    with pytest.raises(StoreError, match="is not writable"):
        Store(blocker)
    assert blocker.read_text() == "not a folder"


def test_default_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INTERP_WORKSPACE", raising=False)
    with Store() as s:
        assert s.path == tmp_path / ".interp" / "results.db"
    monkeypatch.setenv("INTERP_WORKSPACE", str(tmp_path / "env_ws"))
    with Store() as s:
        assert s.path == tmp_path / "env_ws" / "results.db"
        assert s._query("PRAGMA journal_mode")[0][0] == "wal"
        assert s._query("PRAGMA foreign_keys")[0][0] == 1
        assert s._query("SELECT version FROM schema_version")[0][0] == SCHEMA_VERSION


def test_closed_store_raises(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.runs()


def test_code_version() -> None:
    version = code_version()
    assert version.startswith(("0.1.0", "0+"))


CHILD = textwrap.dedent(
    """
    import sys
    import pandas as pd
    from interp.runs.registry import UnitResult
    from interp.runs.store import Store

    ROWS = 5000
    store = Store(sys.argv[1])
    run = store.start_run(
        model="m", model_hash=None, detector="d", variant="v", params={}, dataset_hash=None,
        seed=0, code_version=None, provenance={},
    )
    i = 0
    while True:
        frame = pd.DataFrame(
            {"metric": ["s"] * ROWS, "layer": [i] * ROWS, "head": list(range(ROWS)), "value": [float(i)] * ROWS}
        )
        metrics = pd.DataFrame({"name": ["unit"], "value": [float(i)], "n": [ROWS]})
        run.commit_unit(f"u{i:05d}", UnitResult({"head_scores": frame, "metrics": metrics}), 0.0)
        i += 1
    """
)


def test_sigkill_mid_run_leaves_only_whole_units(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ws)], env=env, stderr=subprocess.PIPE)
    seen = 0
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"writer exited early: {proc.stderr.read().decode() if proc.stderr else ''}")
            db = ws / "results.db"
            if db.exists():
                con = sqlite3.connect(db, timeout=30)
                try:
                    seen = con.execute("SELECT COUNT(*) FROM units").fetchone()[0]
                except sqlite3.OperationalError:
                    seen = 0  # schema not created yet
                finally:
                    con.close()
                if seen >= 2:
                    break
            time.sleep(0.02)
        assert seen >= 2, "writer did not commit 2 units in time"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    with Store(ws) as s:
        runs = s.runs()
        assert len(runs) == 1
        assert runs.loc[0, "status"] == "running"
        run = s.run(int(runs.loc[0, "id"]))
        units = sorted(run.done_units())
        assert len(units) >= seen
        assert units == [f"u{i:05d}" for i in range(len(units))]
        hs = run.results("head_scores")
        assert len(hs) == 5000 * len(units)
        for i, unit in enumerate(units):
            part = hs[hs["unit"] == unit]
            assert len(part) == 5000
            assert part["head"].tolist() == list(range(5000))
            assert set(part["layer"]) == {i}
            assert set(part["value"]) == {float(i)}
        mt = run.results("metrics")
        assert mt["unit"].tolist() == units
        assert s._query("PRAGMA integrity_check")[0][0] == "ok"
        assert s._query("PRAGMA foreign_key_check") == []
        # Resuming picks up exactly where it stopped.
        again = s.start_run(
            model="m",
            model_hash=None,
            detector="d",
            variant="v",
            params={},
            dataset_hash=None,
            seed=0,
            code_version=None,
            provenance={},
        )
        assert again.id == run.id
        assert sorted(again.done_units()) == units
