"""A store of schema version 1 (curves without intervals, metrics without their method) is
migrated when a writer opens it, keeping its rows, and read as it is by a reader.

The version-1 store is built here by hand with sqlite3, as version 1 wrote it, independent of
the code's SQL (:data:`interp.runs.schema.SCHEMA_SQL`), so a change there cannot hide a break.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from interp.errors import StoreError
from interp.runs import schema, store_file, tables
from interp.runs.registry import UnitResult
from interp.runs.store import DB_NAME, Store
from interp.stats import Interval

V1_SQL = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL, model TEXT NOT NULL, model_hash TEXT,
    detector TEXT NOT NULL, variant TEXT NOT NULL, params_json TEXT NOT NULL, dataset_hash TEXT,
    seed INTEGER, code_version TEXT, provenance_json TEXT,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
    error TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL, finished_at TEXT, duration_s REAL);
CREATE TABLE units (
    run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE, unit TEXT NOT NULL,
    finished_at TEXT NOT NULL, duration_s REAL, PRIMARY KEY (run_id, unit));
CREATE TABLE head_scores (run_id INTEGER NOT NULL, unit TEXT NOT NULL,
    metric TEXT, layer INTEGER, head INTEGER, value REAL,
    FOREIGN KEY (run_id, unit) REFERENCES units (run_id, unit) ON DELETE CASCADE);
CREATE TABLE token_layer (run_id INTEGER NOT NULL, unit TEXT NOT NULL,
    kind TEXT, item, token_index INTEGER, token TEXT, layer INTEGER, value REAL,
    FOREIGN KEY (run_id, unit) REFERENCES units (run_id, unit) ON DELETE CASCADE);
CREATE TABLE curves (run_id INTEGER NOT NULL, unit TEXT NOT NULL,
    curve TEXT, layer INTEGER, head INTEGER, x REAL, y REAL,
    FOREIGN KEY (run_id, unit) REFERENCES units (run_id, unit) ON DELETE CASCADE);
CREATE TABLE metrics (run_id INTEGER NOT NULL, unit TEXT NOT NULL,
    name TEXT, value REAL, ci_low REAL, ci_high REAL, n INTEGER,
    FOREIGN KEY (run_id, unit) REFERENCES units (run_id, unit) ON DELETE CASCADE);
CREATE TABLE artifacts (run_id INTEGER NOT NULL, unit TEXT NOT NULL, name TEXT, json TEXT,
    FOREIGN KEY (run_id, unit) REFERENCES units (run_id, unit) ON DELETE CASCADE);
INSERT INTO schema_version VALUES (1);
INSERT INTO runs (id, key, model, detector, variant, params_json, provenance_json, status, created_at, updated_at)
    VALUES (1, 'k1', 'tiny', 'knockout', 'faithful', '{}', '{}', 'done', '2026-01-01', '2026-01-01');
INSERT INTO units VALUES (1, 'final', '2026-01-01', 0.5);
INSERT INTO curves VALUES (1, 'final', 'subject', NULL, NULL, 0.0, -0.25), (1, 'final', 'subject', NULL, NULL, 1.0, -0.5);
INSERT INTO metrics VALUES (1, 'final', 'acc', 0.75, 0.5, 0.9, 12);
"""

V1_CURVES = ["run_id", "unit", "curve", "layer", "head", "x", "y"]
V1_METRICS = ["run_id", "unit", "name", "value", "ci_low", "ci_high", "n"]


@pytest.fixture
def v1_store(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    con = sqlite3.connect(ws / DB_NAME)
    # Version 1's marker, and its journal mode.
    con.execute(f"PRAGMA application_id = {0x6977626B}")
    con.execute("PRAGMA user_version = 1")
    con.execute("PRAGMA journal_mode = WAL")
    con.executescript(V1_SQL)
    con.commit()
    con.close()
    return ws


def _raw(ws: Path) -> dict[str, object]:
    """What the file holds, read with plain sqlite3: columns, version rows, header version, rows."""
    con = sqlite3.connect(ws / DB_NAME)
    try:
        return {
            "curves": [r[1] for r in con.execute("PRAGMA table_info(curves)")],
            "metrics": [r[1] for r in con.execute("PRAGMA table_info(metrics)")],
            "versions": [r[0] for r in con.execute("SELECT version FROM schema_version")],
            "user_version": con.execute("PRAGMA user_version").fetchone()[0],
            "curve_rows": con.execute("SELECT curve, x, y FROM curves ORDER BY rowid").fetchall(),
            "metric_rows": con.execute("SELECT name, value, ci_low, ci_high, n FROM metrics").fetchall(),
        }
    finally:
        con.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_read_only_v1_store_reads_and_is_not_written(v1_store: Path, tmp_path: Path) -> None:
    before = _digest(v1_store / DB_NAME)
    with Store(v1_store, read_only=True) as s:
        run = s.run(1)
        cv = run.to_frame("curves")
        mt = run.to_frame("metrics")
        written = s.export(None, tmp_path / "out")
    assert _digest(v1_store / DB_NAME) == before
    raw = _raw(v1_store)
    assert (raw["curves"], raw["metrics"], raw["versions"], raw["user_version"]) == (V1_CURVES, V1_METRICS, [1], 1)
    # Every column of today's schema, the ones version 1 lacked empty.
    assert list(cv.columns) == ["unit", *tables.columns("curves")]
    assert cv["y"].tolist() == [-0.25, -0.5]
    assert cv[["ci_low", "ci_high", "n", "ci_method"]].isna().to_numpy().all()
    assert mt[["name", "value", "ci_low", "ci_high", "n"]].iloc[0].tolist() == ["acc", 0.75, 0.5, 0.9, 12]
    assert pd.isna(mt["ci_method"].iloc[0])
    exported = pd.read_csv(tmp_path / "out" / "curves.csv")
    assert tmp_path / "out" / "curves.csv" in written
    assert list(exported.columns) == ["run_id", "unit", *tables.columns("curves")]
    assert exported["y"].tolist() == [-0.25, -0.5]


def test_a_writer_migrates_a_v1_store_keeping_its_rows(v1_store: Path) -> None:
    old = _raw(v1_store)
    with Store(v1_store, create=False) as s:
        assert s.run(1).to_frame("curves")["y"].tolist() == [-0.25, -0.5]
        run = s.start_run(model="tiny", model_hash=None, detector="knockout", variant="faithful", params={"n": 2},
                          dataset_hash=None, seed=0, code_version=None, provenance={})
        iv = Interval(0.5, 0.25, 0.75, 8, "wilson", 0.95)
        run.commit_unit("final", UnitResult({"curves": tables.interval_curves([("acc", None, None, 1.0, iv)]),
                                             "metrics": tables.with_intervals({}, {"acc": iv})["metrics"]}), 0.0)
        new_cv, new_mt = run.to_frame("curves"), run.to_frame("metrics")
    raw = _raw(v1_store)
    assert raw["curves"] == [*V1_CURVES, "ci_low", "ci_high", "n", "ci_method"]
    assert raw["metrics"] == [*V1_METRICS, "ci_method"]
    assert (raw["versions"], raw["user_version"]) == ([schema.SCHEMA_VERSION], 2)
    assert store_file.header(v1_store / DB_NAME)[68:72] == (0x6977626B).to_bytes(4, "big")
    # The old rows are kept, the new ones follow them.
    assert raw["curve_rows"] == [*old["curve_rows"], ("acc", 1.0, 0.5)]  # type: ignore[misc]
    assert raw["metric_rows"] == [*old["metric_rows"], ("acc", 0.5, 0.25, 0.75, 8)]  # type: ignore[misc]
    assert new_cv[["ci_low", "ci_high", "n", "ci_method"]].iloc[0].tolist() == [0.25, 0.75, 8, "wilson"]
    assert new_mt["ci_method"].tolist() == ["wilson"]
    # Opened again: nothing left to migrate, nothing changed.
    with Store(v1_store, create=False) as s:
        assert len(s.runs()) == 2
    assert _raw(v1_store) == raw


def test_a_migration_that_fails_leaves_the_v1_store_as_it_was(
    v1_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The columns, the version row and the marker change in one transaction: a statement that
    fails after some columns were added undoes them all."""
    old = _raw(v1_store)
    real = schema.migration_sql

    def failing(present: dict[str, set[str]]) -> list[str]:
        return [*real(present), "ALTER TABLE curves ADD COLUMN ci_low REAL"]  # a duplicate column

    monkeypatch.setattr("interp.runs.store.migration_sql", failing)
    with pytest.raises(StoreError, match="duplicate column"):
        Store(v1_store, create=False)
    assert _raw(v1_store) == old
