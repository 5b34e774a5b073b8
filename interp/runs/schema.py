"""The results store's schema: its SQL, the result tables and their columns, the units the runner
writes besides a detector's own, run statuses and export formats, and the checks a unit's tables
pass before they are written (:func:`validate_tables`)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd

from interp.errors import UserError
from interp.runs.run_keys import json_default

# 2: curves carry an interval (ci_low, ci_high, n, ci_method) and metrics their method
# (ci_method). A writer opening a store of version 1 adds the columns (:func:`migration_sql`).
SCHEMA_VERSION = 2


RunStatus = Literal["running", "done", "failed", "interrupted"]


FinalStatus = Literal["done", "failed", "interrupted"]


ExportFormat = Literal["csv", "parquet"]


# Units the runner writes besides the detector's own: the aggregated tables, the warnings, and
# how the run was computed (variant, its prose, the parameters).
FINAL_UNIT = "final"


WARNINGS_UNIT = "warnings"


SETTINGS_UNIT = "settings"


RESERVED_UNITS = (FINAL_UNIT, WARNINGS_UNIT, SETTINGS_UNIT)


RUN_STATUSES: tuple[str, ...] = ("running", "done", "failed", "interrupted")


EXPORT_FORMATS: tuple[str, ...] = ("csv", "parquet")


# Result tables: (column, SQLite type). Empty type = no affinity, so a value keeps its own type
# (``item`` may be an index or a name depending on the detector).
TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "head_scores": (("metric", "TEXT"), ("layer", "INTEGER"), ("head", "INTEGER"), ("value", "REAL")),
    "token_layer": (
        ("kind", "TEXT"),
        ("item", ""),
        ("token_index", "INTEGER"),
        ("token", "TEXT"),
        ("layer", "INTEGER"),
        ("value", "REAL"),
    ),
    # A point that is a mean over items carries its confidence interval, the number of items
    # and how the interval was made (Interval.method); empty where y is not such a mean.
    "curves": (
        ("curve", "TEXT"),
        ("layer", "INTEGER"),
        ("head", "INTEGER"),
        ("x", "REAL"),
        ("y", "REAL"),
        ("ci_low", "REAL"),
        ("ci_high", "REAL"),
        ("n", "INTEGER"),
        ("ci_method", "TEXT"),
    ),
    "metrics": (
        ("name", "TEXT"),
        ("value", "REAL"),
        ("ci_low", "REAL"),
        ("ci_high", "REAL"),
        ("n", "INTEGER"),
        ("ci_method", "TEXT"),
    ),
    "artifacts": (("name", "TEXT"), ("json", "TEXT")),
}


# A table without these is certainly a bug in the detector; the other columns may be left out.
REQUIRED_COLUMNS: dict[str, frozenset[str]] = {
    "head_scores": frozenset({"layer", "head", "value"}),
    "token_layer": frozenset({"layer", "value"}),
    "curves": frozenset({"curve", "x", "y"}),
    "metrics": frozenset({"name", "value"}),
    "artifacts": frozenset({"name", "json"}),
}


RUN_COLUMNS: tuple[str, ...] = (
    "id",
    "key",
    "model",
    "model_hash",
    "detector",
    "variant",
    "params_json",
    "dataset_hash",
    "seed",
    "code_version",
    "provenance_json",
    "status",
    "error",
    "created_at",
    "updated_at",
    "finished_at",
    "duration_s",
)


_STATUS_LIST = ", ".join(f"'{s}'" for s in RUN_STATUSES)


SCHEMA_SQL: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    f"""CREATE TABLE IF NOT EXISTS runs (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL,
        model TEXT NOT NULL,
        model_hash TEXT,
        detector TEXT NOT NULL,
        variant TEXT NOT NULL,
        params_json TEXT NOT NULL,
        dataset_hash TEXT,
        seed INTEGER,
        code_version TEXT,
        provenance_json TEXT,
        status TEXT NOT NULL CHECK (status IN ({_STATUS_LIST})),
        error TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        finished_at TEXT,
        duration_s REAL
    )""",
    "CREATE INDEX IF NOT EXISTS idx_runs_key ON runs (key)",
    """CREATE TABLE IF NOT EXISTS units (
        run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        unit TEXT NOT NULL,
        finished_at TEXT NOT NULL,
        duration_s REAL,
        PRIMARY KEY (run_id, unit)
    )""",
    *(
        stmt
        for table, columns in TABLES.items()
        for stmt in (
            # The foreign key to units makes rows without their unit row impossible, and lets
            # deleting a unit (re-commit) or a run cascade to its rows.
            f"""CREATE TABLE IF NOT EXISTS {table} (
                run_id INTEGER NOT NULL,
                unit TEXT NOT NULL,
                {", ".join(f"{name} {kind}".strip() for name, kind in columns)},
                FOREIGN KEY (run_id, unit) REFERENCES units (run_id, unit) ON DELETE CASCADE
            )""",
            # (run_id, unit) serves lookups by run_id alone and the cascades from units.
            f"CREATE INDEX IF NOT EXISTS idx_{table}_run ON {table} (run_id, unit)",
        )
    ),
)


def migration_sql(present: Mapping[str, set[str]]) -> list[str]:
    """The statements that bring a store of an older version to :data:`SCHEMA_VERSION`, given
    the columns each of its result tables has (``present``): every column of :data:`TABLES` it
    lacks, added empty (NULL in the rows already there). A table it lacks altogether is made
    whole by :data:`SCHEMA_SQL`'s ``CREATE TABLE IF NOT EXISTS``."""
    return [
        f"ALTER TABLE {table} ADD COLUMN {f'{name} {kind}'.strip()}"
        for table, columns in TABLES.items()
        if table in present
        for name, kind in columns
        if name not in present[table]
    ]


def check_export_format(fmt: str) -> None:
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r} (formats: {', '.join(EXPORT_FORMATS)})")


def check_table(table: str) -> tuple[tuple[str, str], ...]:
    if table not in TABLES:
        raise UserError(f"unknown table {table!r} (tables: {', '.join(TABLES)})")
    return TABLES[table]


_SQL_TYPES = (str, int, float, bytes)


def _json_cell(value: Any) -> str | None:
    """An artifacts.json cell: a JSON text is kept as is, any other document is encoded."""
    if isinstance(value, str):
        return value
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        return json.dumps(value, sort_keys=True, ensure_ascii=False, default=json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"table 'artifacts', column 'json': value is not JSON-serialisable: {exc}") from None


def column_values(table: str, column: str, series: pd.Series) -> list[Any]:
    """A column as plain Python values sqlite3 can bind, missing values as None."""
    if table == "artifacts" and column == "json":
        return [_json_cell(v) for v in series.tolist()]
    # astype(object) turns numpy scalars into Python ones for numeric dtypes.
    values: list[Any] = series.astype(object).where(series.notna(), None).tolist()
    if series.dtype == object or isinstance(series.dtype, pd.CategoricalDtype):
        for i, v in enumerate(values):
            if isinstance(v, np.generic):
                values[i] = v = v.item()
            if v is not None and not isinstance(v, _SQL_TYPES):
                raise ValueError(
                    f"table {table!r}, column {column!r}: unsupported value {v!r} of type {type(v).__name__}"
                )
    return values


def validate_tables(tables: Mapping[str, pd.DataFrame]) -> None:
    for table, frame in tables.items():
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r} (tables: {', '.join(TABLES)})")
        if not isinstance(frame, pd.DataFrame):
            raise ValueError(f"table {table!r} must be a pandas DataFrame, got {type(frame).__name__}")
        known = {name for name, _ in TABLES[table]}
        columns = [str(c) for c in frame.columns]
        reserved = sorted({"run_id", "unit"} & set(columns))
        if reserved:
            raise ValueError(f"table {table!r}: column {reserved[0]!r} is set by the store, drop it")
        unknown = sorted(set(columns) - known)
        if unknown:
            raise ValueError(
                f"table {table!r}: unknown column(s) {unknown} (known: {', '.join(n for n, _ in TABLES[table])})"
            )
        if len(set(columns)) != len(columns):
            raise ValueError(f"table {table!r}: duplicate column names {columns}")
        missing = sorted(REQUIRED_COLUMNS[table] - set(columns))
        if missing and len(frame):
            raise ValueError(f"table {table!r}: missing required column(s) {missing}")
