"""The results store: one embedded SQLite file per workspace (``<workspace>/results.db``).

A run is one detector applied to one model with fixed parameters; its work is committed unit by
unit, each unit in a single transaction, so a run killed at any point (Ctrl-C, OOM, ``kill -9``)
holds exactly the units that finished and resumes from there. Results are long tables (see
:class:`interp.runs.registry.UnitResult`) keyed by ``(run_id, unit)``.

WAL mode lets the dashboard and other CLI processes read while one process writes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pandas as pd

from interp.errors import StoreError, UserError
from interp.model.prefix import describe_stored
from interp.runs import store_file
from interp.runs.registry import UnitResult
from interp.runs.run_keys import canonical_json, key_context, run_key
from interp.runs.schema import (
    RUN_COLUMNS,
    RUN_STATUSES,
    SCHEMA_SQL,
    SCHEMA_VERSION,
    TABLES,
    ExportFormat,
    FinalStatus,
    RunStatus,
    check_export_format,
    check_table,
    column_values,
    migration_sql,
    validate_tables,
)

DB_NAME = "results.db"
WORKSPACE_ENV = "INTERP_WORKSPACE"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _default_workspace() -> Path:
    env = os.environ.get(WORKSPACE_ENV)
    return Path(env) if env else Path.cwd() / ".interp"


def _ensure_writable(path: Path) -> None:
    st = store_file.path_state(path, "workspace")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"workspace {store_file.short_path(path)} is not writable: it is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # os.access is wrong for root and for some network/ACL filesystems: really write a file.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise StoreError(
            f"workspace {store_file.short_path(path)} is not writable: {store_file.os_reason(exc)}") from None


def _provenance_of(provenance_json: str | None) -> dict[str, Any]:
    try:
        stored = json.loads(provenance_json) if provenance_json else {}
    except ValueError:
        return {}
    return stored if isinstance(stored, dict) else {}


def _prefix_of(provenance_json: str | None) -> Any:
    return _provenance_of(provenance_json).get("prefix")


class Store:
    """The results store of one workspace. One SQLite connection, shared by the object's users.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self, workspace: str | Path | None = None, *, create: bool = True, read_only: bool = False
    ) -> None:
        """Open the store of ``workspace`` (default: ``$INTERP_WORKSPACE`` or ``./.interp``).

        With ``create`` (writers: scan, run) a missing workspace and store are made; without it
        a workspace with no ``results.db`` is an error and nothing is created, so a mistyped path
        is not silently an empty store. ``read_only`` (readers: runs, export, the dashboard's
        launcher) also never writes a byte, so a store on a read-only file or folder can be read.
        Whatever the mode, a ``results.db`` that is not a workbench store is refused before
        anything is written (:mod:`interp.runs.store_file`).
        """
        path = Path(workspace).expanduser() if workspace is not None else _default_workspace()
        mode: store_file.OpenMode = "read" if read_only else "create" if create else "write"
        if mode == "create":
            _ensure_writable(path)
        self.workspace: Path = path
        self.path: Path = path / DB_NAME
        # RLock: a write helper may call a read helper while holding it.
        self._lock = threading.RLock()
        self._con: sqlite3.Connection | None = None
        # The result tables' columns in the file: all of TABLES' once a writer has opened it; an
        # older store opened read-only lacks the newer ones, which read as NULL (:meth:`_select`).
        self._columns: dict[str, set[str]] = {}
        found = store_file.recognise(self.path, TABLES)
        if found == "new" and mode != "create":
            raise StoreError(
                f"no results store at {path.absolute()} (run `interp scan` or `interp run` to create one)"
            )
        try:
            con = store_file.connect(self.path, mode)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open results store {self.path}: {exc}") from None
        self._con = con
        try:
            con.execute("PRAGMA foreign_keys = ON")
            if mode == "read":
                self._check_version(self._query("SELECT MAX(version) FROM schema_version"))
                self._columns = store_file.table_columns(con, TABLES)
                return
            if found == "new":
                # The marker first, in the file's first write: no moment where the file holds a
                # database without it (and would be refused as another tool's).
                store_file.stamp(con, SCHEMA_VERSION)
            con.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL keeps every commit atomic and durable against a process crash;
            # only a power loss may drop the last commits, which then are simply recomputed.
            con.execute("PRAGMA synchronous = NORMAL")
            self._init_schema()
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot open results store {self.path}: {exc}") from None
        except BaseException:
            self.close()
            raise

    # -- plumbing -------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            raise StoreError(f"results store {self.path} is closed")
        return self._con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside commits together or not at all."""
        with self._lock:
            con = self._connection()
            try:
                con.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write to results store {self.path}: {exc}") from None
            try:
                yield con
                con.execute("COMMIT")
            except BaseException as exc:
                # SQLite may already have rolled back (disk full, I/O error).
                if con.in_transaction:
                    con.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"cannot write to results store {self.path}: {exc}") from exc
                raise

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._connection().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read results store {self.path}: {exc}") from None

    def _frame(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        with self._lock:
            try:
                cur = self._connection().execute(sql, params)
                rows = cur.fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read results store {self.path}: {exc}") from None
            columns = [d[0] for d in cur.description]
        return pd.DataFrame.from_records(rows, columns=columns, coerce_float=True)

    def _init_schema(self) -> None:
        """Make the schema, or bring an older store's to this version: in one transaction, so a
        store is either migrated whole (columns, version, marker) or left as it was."""
        with self._write() as con:
            for stmt in SCHEMA_SQL:
                con.execute(stmt)
            self._check_version(con.execute("SELECT MAX(version) FROM schema_version").fetchall())
            for stmt in migration_sql(store_file.table_columns(con, TABLES)):
                con.execute(stmt)
            if con.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            else:
                con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            store_file.stamp(con, SCHEMA_VERSION)
            self._columns = store_file.table_columns(con, TABLES)

    def _select(self, table: str, lead: Sequence[str], tail: str, params: Sequence[Any]) -> pd.DataFrame:
        """``lead`` and the table's columns of the rows ``tail`` (WHERE ... ORDER BY ...) picks; a
        column (or table) the store does not have yet reads as NULL (as no rows)."""
        names = [name for name, _ in check_table(table)]
        have = self._columns.get(table)
        if have is None:
            return pd.DataFrame(columns=[*lead, *names])
        cols = ", ".join([*lead, *(n if n in have else f"NULL AS {n}" for n in names)])
        return self._frame(f"SELECT {cols} FROM {table} {tail}", params)

    def _check_version(self, rows: Sequence[Sequence[Any]]) -> None:
        version = rows[0][0] if rows else None
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(
                f"results store {self.path} has schema version {version}, newer than this "
                f"interp-workbench supports ({SCHEMA_VERSION}): upgrade interp-workbench"
            )

    def _run_row(self, run_id: int) -> dict[str, Any]:
        rows = self._query(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise UserError(f"no run with id {run_id} in {self.path}")
        return dict(zip(RUN_COLUMNS, rows[0], strict=True))

    # -- runs -----------------------------------------------------------------------------------

    def start_run(
        self,
        *,
        model: str,
        model_hash: str | None,
        detector: str,
        variant: str,
        params: Mapping[str, Any],
        dataset_hash: str | None,
        seed: int | None,
        code_version: str | None,
        provenance: Mapping[str, Any],
        resume: bool = True,
        identity: Callable[[Mapping[str, Any]], tuple[str, Mapping[str, Any]] | None] | None = None,
    ) -> Run:
        """Start a run, or resume the newest unfinished run with the same key.

        A finished ('done') run is never resumed: asking again means a rerun, which gets a new
        id. Use :meth:`find_run` first to reuse a finished run's results instead.

        ``identity`` maps a stored run's parameters to (variant, parameters) as the caller's
        version writes them. An unfinished run of the same model and detector stored by an
        older version (parameters written another way, a reworded variant) whose key under
        today's rules matches is re-keyed and resumed, so upgrading never orphans a run.
        """
        key = run_key(model=model, model_hash=model_hash, detector=detector, variant=variant, params=params,
                      dataset_hash=dataset_hash, seed=seed, **key_context(provenance))
        params_json = canonical_json(dict(params), "params")
        provenance_json = canonical_json(dict(provenance), "provenance")
        now = _now()
        with self._write() as con:
            if resume and identity is not None:
                self._rekey_older(con, key, detector, variant, params_json, identity)
            # Looked up inside the write transaction so two processes cannot both create the run.
            row = (
                con.execute(
                    "SELECT id FROM runs WHERE key = ? AND status != 'done' ORDER BY id DESC LIMIT 1", (key,)
                ).fetchone()
                if resume
                else None
            )
            if row is not None:
                run_id = int(row[0])
                con.execute(
                    "UPDATE runs SET status = 'running', error = NULL, finished_at = NULL, updated_at = ? "
                    "WHERE id = ?",
                    (now, run_id),
                )
                resumed = True
            else:
                values = (key, model, model_hash, detector, variant, params_json, dataset_hash, seed,
                          code_version, provenance_json, now, now)
                run_id, resumed = self._insert_run(con, values), False
        return Run(self, run_id, key, resumed=resumed, started=True)

    @staticmethod
    def _insert_run(con: sqlite3.Connection, values: tuple[Any, ...]) -> int:
        cur = con.execute(
            "INSERT INTO runs (key, model, model_hash, detector, variant, params_json, dataset_hash, "
            "seed, code_version, provenance_json, status, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)",
            values,
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    @staticmethod
    def _rekey_older(
        con: sqlite3.Connection,
        key: str,
        detector: str,
        variant: str,
        params_json: str,
        identity: Callable[[Mapping[str, Any]], tuple[str, Mapping[str, Any]] | None],
    ) -> None:
        rows = con.execute(
            "SELECT id, model, model_hash, variant, params_json, dataset_hash, seed, provenance_json "
            "FROM runs WHERE detector = ? AND status != 'done' AND key != ?",
            (detector, key),
        ).fetchall()
        for run_id, model, model_hash, _, stored_json, dataset_hash, seed, provenance_json in rows:
            now = identity(json.loads(stored_json))
            if now is None:
                continue
            now_key = run_key(
                model=model, model_hash=model_hash, detector=detector, variant=now[0], params=now[1],
                dataset_hash=dataset_hash, seed=seed, **key_context(_provenance_of(provenance_json)),
            )
            if now_key == key:
                con.execute(
                    "UPDATE runs SET key = ?, variant = ?, params_json = ? WHERE id = ?",
                    (key, variant, params_json, run_id),
                )

    def find_run(self, key: str, status: RunStatus | None = None) -> Run | None:
        """The newest run with this key (and status, if given), or None."""
        if status is None:
            rows = self._query("SELECT id, key FROM runs WHERE key = ? ORDER BY id DESC LIMIT 1", (key,))
        else:
            rows = self._query(
                "SELECT id, key FROM runs WHERE key = ? AND status = ? ORDER BY id DESC LIMIT 1",
                (key, status),
            )
        return Run(self, int(rows[0][0]), str(rows[0][1])) if rows else None

    def run(self, run_id: int) -> Run:
        """An existing run; UserError if there is none with this id."""
        row = self._run_row(run_id)
        return Run(self, int(row["id"]), str(row["key"]))

    def runs(self) -> pd.DataFrame:
        """One row per run, newest first, with the number of committed units."""
        return self._runs_frame(None)

    def _runs_frame(self, run_id: int | None) -> pd.DataFrame:
        cols = ", ".join(f"r.{c}" for c in RUN_COLUMNS)
        where, params = ("WHERE r.id = ?", (run_id,)) if run_id is not None else ("", ())
        frame = self._frame(
            f"SELECT {cols}, COUNT(u.unit) AS n_units FROM runs r "
            f"LEFT JOIN units u ON u.run_id = r.id {where} GROUP BY r.id ORDER BY r.id DESC",
            params,
        )
        frame["prefix"] = [describe_stored(_prefix_of(p)) for p in frame["provenance_json"]]
        return frame

    def delete_run(self, run_id: int) -> None:
        """Delete a run with all its units and rows."""
        with self._write() as con:
            if con.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount == 0:
                raise UserError(f"no run with id {run_id} in {self.path}")

    def to_frame(self, run_id: int, table: str, unit: str | None = None) -> pd.DataFrame:
        """A run's rows of one table (columns: unit, then the table's), optionally of one unit."""
        return self.run(run_id).to_frame(table, unit)

    def export(self, run_id: int | None, out_dir: str | Path, fmt: ExportFormat | str = "csv") -> list[Path]:
        """Write runs.<fmt> and one <table>.<fmt> per non-empty table, for one run or all.

        Table files carry run_id and unit columns. Returns the written paths.
        """
        check_export_format(fmt)
        if run_id is not None:
            self._run_row(run_id)
        out = Path(out_dir).expanduser()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create export folder {out}: {exc.strerror or exc}") from None
        where, params = ("WHERE run_id = ?", (run_id,)) if run_id is not None else ("", ())

        frames: list[tuple[str, pd.DataFrame]] = [("runs", self._runs_frame(run_id))]
        for table in TABLES:
            frame = self._select(table, ("run_id", "unit"), f"{where} ORDER BY run_id, rowid", params)
            if len(frame):
                frames.append((table, frame))

        written: list[Path] = []
        for name, frame in frames:
            path = out / f"{name}.{fmt}"
            try:
                if fmt == "csv":
                    frame.to_csv(path, index=False)
                else:
                    frame.to_parquet(path, index=False)
            except OSError as exc:
                raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
            written.append(path)
        return written

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.workspace)!r})"


class Run:
    """A handle on one run of the store. Cheap: state lives in the database, not the object."""

    def __init__(self, store: Store, run_id: int, key: str, *, resumed: bool = False, started: bool = False):
        self.store = store
        self.id = run_id
        self.key = key
        # Whether start_run picked up an unfinished run rather than creating one.
        self.resumed = resumed
        # Only the session that started the run adds its wall time to duration_s on finish.
        self._t0: float | None = time.monotonic() if started else None

    def info(self) -> dict[str, Any]:
        """The run's row of the runs table, with params and provenance decoded."""
        row = self.store._run_row(self.id)
        row["params"] = json.loads(row["params_json"]) if row["params_json"] else {}
        row["provenance"] = json.loads(row["provenance_json"]) if row["provenance_json"] else {}
        return row

    @property
    def status(self) -> str:
        return str(self.store._run_row(self.id)["status"])

    def done_units(self) -> set[str]:
        rows = self.store._query("SELECT unit FROM units WHERE run_id = ?", (self.id,))
        return {str(r[0]) for r in rows}

    def commit_unit(self, unit: str, result: UnitResult, duration_s: float) -> None:
        """Write a unit and all its tables in one transaction; a unit committed again is replaced.

        ValueError for an unknown table, an unknown column or an unsupported value; nothing of
        the unit is written then (and a previous commit of it is kept).
        """
        validate_tables(result.tables)
        now = _now()
        with self.store._write() as con:
            # Cascades to the unit's rows in every table.
            con.execute("DELETE FROM units WHERE run_id = ? AND unit = ?", (self.id, unit))
            try:
                con.execute(
                    "INSERT INTO units (run_id, unit, finished_at, duration_s) VALUES (?, ?, ?, ?)",
                    (self.id, unit, now, float(duration_s)),
                )
            except sqlite3.IntegrityError:
                raise StoreError(f"run {self.id} no longer exists in {self.store.path}") from None
            for table, frame in result.tables.items():
                if not len(frame):
                    continue
                columns = [str(c) for c in frame.columns]
                values = [column_values(table, str(col), series) for col, series in frame.items()]
                placeholders = ", ".join("?" for _ in range(len(columns) + 2))
                con.executemany(
                    f"INSERT INTO {table} (run_id, unit, {', '.join(columns)}) VALUES ({placeholders})",
                    ((self.id, unit, *row) for row in zip(*values, strict=True)),
                )
            con.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now, self.id))

    def finish(self, status: FinalStatus | str = "done", error: str | None = None) -> None:
        """Record the end of the run (or of this session of it, for failed/interrupted)."""
        if status not in RUN_STATUSES or status == "running":
            raise ValueError(f"finish status must be 'done', 'failed' or 'interrupted', got {status!r}")
        now = _now()
        elapsed = time.monotonic() - self._t0 if self._t0 is not None else None
        with self.store._write() as con:
            # duration_s accumulates over resumed sessions: the compute time the run took.
            cur = con.execute(
                "UPDATE runs SET status = ?, error = ?, finished_at = ?, updated_at = ?, "
                "duration_s = CASE WHEN ? IS NULL THEN duration_s ELSE COALESCE(duration_s, 0) + ? END "
                "WHERE id = ?",
                (status, error, now, now, elapsed, elapsed, self.id),
            )
            if cur.rowcount == 0:
                raise UserError(f"no run with id {self.id} in {self.store.path}")
        self._t0 = None

    @contextmanager
    def guard(self) -> Iterator[Run]:
        """Mark the run 'failed' (with the error) or 'interrupted' if the block raises; re-raise.

        Leaving the block normally changes nothing: call :meth:`finish` when the run is done.
        """
        try:
            yield self
        except (KeyboardInterrupt, SystemExit) as exc:
            self._finish_quietly("interrupted", "interrupted", exc)
            raise
        except Exception as exc:
            self._finish_quietly("failed", f"{type(exc).__name__}: {exc}", exc)
            raise

    def _finish_quietly(self, status: FinalStatus, error: str, exc: BaseException) -> None:
        # The original exception matters more than a failure to record it.
        try:
            self.finish(status, error)
        except (UserError, sqlite3.Error) as store_exc:
            exc.add_note(f"(could not mark run {self.id} as {status}: {store_exc})")

    def results(self, table: str) -> pd.DataFrame:
        """All units' rows of one table, in commit order, with a ``unit`` column."""
        return self.to_frame(table)

    def all_results(self) -> dict[str, pd.DataFrame]:
        """Every non-empty table of the run, as :meth:`results` returns it."""
        frames = {table: self.results(table) for table in TABLES}
        return {table: frame for table, frame in frames.items() if len(frame)}

    def to_frame(self, table: str = "head_scores", unit: str | None = None) -> pd.DataFrame:
        """The run's rows of one table (columns: unit, then the table's), optionally of one unit."""
        if unit is None:
            return self.store._select(table, ("unit",), "WHERE run_id = ? ORDER BY rowid", (self.id,))
        return self.store._select(table, ("unit",), "WHERE run_id = ? AND unit = ? ORDER BY rowid", (self.id, unit))

    def __repr__(self) -> str:
        return f"Run(id={self.id}, key={self.key[:12]!r})"
