"""Opening a results store's SQLite file: what it is is decided before anything is written.

A workbench store carries a marker in its SQLite header (``PRAGMA application_id`` =
:data:`APPLICATION_ID`, ``PRAGMA user_version`` = the schema version). Stores written before the
marker existed carry none; they are recognised by their tables (:func:`is_workbench_schema`) and
stamped the first time a writer opens them. Any other file, a SQLite database of another tool
included, is refused in one line and left byte for byte as it was: it is read through the
header bytes and through an ``immutable`` read-only connection, neither of which writes a byte
or creates a journal beside it.

Readers (``interp runs``, ``interp export``, ``interp app``'s check) open the store read-only,
so they also work on a store kept on a read-only file or folder.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from interp.errors import StoreError

# "iwbk" (interp-workbench) as a big-endian 32-bit integer, in the header at byte 68.
APPLICATION_ID = 0x6977626B
SQLITE_MAGIC = b"SQLite format 3\x00"
_HEADER_BYTES = 100
_USER_VERSION_AT, _APPLICATION_ID_AT = 60, 68

OpenMode = Literal["create", "write", "read"]

# The tables every store has had since the first release (a store without the marker is ours when
# it has these and nothing else but the result tables and SQLite's own).
CORE_TABLES = frozenset({"schema_version", "runs", "units"})
_RUN_COLUMNS = frozenset({"id", "key", "model", "detector", "variant", "params_json", "status"})
_UNIT_COLUMNS = frozenset({"run_id", "unit", "finished_at"})


def path_state(path: Path, what: str) -> os.stat_result | None:
    """``os.stat`` of ``path``, None when nothing is there; StoreError (one line) for a name the
    file system refuses (too long, a loop, no permission) instead of an OSError."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise StoreError(f"{what} {short_path(path)}: {os_reason(exc)}") from None


def os_reason(exc: OSError) -> str:
    """Why the file system refused, in words (an over-long name said as such)."""
    if exc.errno == errno.ENAMETOOLONG:
        return "the name is too long for the file system"
    return exc.strerror or str(exc)


def short_path(path: Path, keep: int = 240) -> str:
    """A path for a one-line message: a name of thousands of characters is shortened."""
    text = str(path)
    return text if len(text) <= keep else f"{text[:keep // 2]}...{text[-keep // 2:]} ({len(text)} characters)"


def header(path: Path) -> bytes:
    """The first 100 bytes of the file (fewer for a shorter file)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(_HEADER_BYTES)
    except OSError as exc:
        raise StoreError(f"cannot read results store {path}: {exc.strerror or exc}") from None


def _header_int(head: bytes, at: int) -> int:
    return int.from_bytes(head[at:at + 4], "big")


def is_workbench_schema(tables: Iterable[str], run_columns: Iterable[str], unit_columns: Iterable[str],
                        result_tables: Iterable[str]) -> bool:
    """Whether a database without the marker holds the workbench's schema: the core tables with
    their key columns, and no table that is neither ours nor SQLite's own."""
    names = {t for t in tables if not t.startswith("sqlite_")}
    ours = CORE_TABLES | set(result_tables)
    return CORE_TABLES <= names <= ours and set(run_columns) >= _RUN_COLUMNS and set(unit_columns) >= _UNIT_COLUMNS


def _immutable_uri(path: Path) -> str:
    return f"{path.absolute().as_uri()}?mode=ro&immutable=1"


def _describe_foreign(path: Path, result_tables: Iterable[str]) -> str | None:
    """Why a SQLite file without the marker is not a workbench store, or None if it is one."""
    try:
        con = sqlite3.connect(_immutable_uri(path), uri=True)
    except sqlite3.Error as exc:
        return f"it cannot be read as SQLite ({exc})"
    try:
        tables = [str(r[0]) for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        run_columns = [str(r[1]) for r in con.execute("PRAGMA table_info(runs)")]
        unit_columns = [str(r[1]) for r in con.execute("PRAGMA table_info(units)")]
    except sqlite3.Error as exc:
        return f"it cannot be read as SQLite ({exc})"
    finally:
        con.close()
    if is_workbench_schema(tables, run_columns, unit_columns, result_tables):
        return None
    shown = sorted(t for t in tables if not t.startswith("sqlite_"))
    if not shown:
        return "it is an empty SQLite database of another tool"
    listed = ", ".join(shown[:6]) + (f" and {len(shown) - 6} more" if len(shown) > 6 else "")
    return f"it is a SQLite database with other tables ({listed})"


def recognise(path: Path, result_tables: Iterable[str]) -> Literal["new", "marked", "unmarked"]:
    """What the file at ``path`` is, read without writing anything: ``new`` (no file, or an
    empty one: a writer makes the store), ``marked`` (a store with the workbench's marker) or
    ``unmarked`` (a store written before the marker). Anything else: StoreError, one line."""
    st = path_state(path, "results store")
    if st is None or (stat.S_ISREG(st.st_mode) and st.st_size == 0):
        return "new"
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path} is not a results store: it is not a file")
    head = header(path)
    refuse = f"{path} is not an interp-workbench results store, and was left as it is"
    if not head.startswith(SQLITE_MAGIC) or len(head) < _HEADER_BYTES:
        raise StoreError(f"{refuse}: it is not a SQLite database")
    app_id = _header_int(head, _APPLICATION_ID_AT)
    if app_id == APPLICATION_ID:
        return "marked"
    if app_id != 0:
        raise StoreError(f"{refuse}: its SQLite application id is {app_id:#010x}, not the workbench's "
                         f"({APPLICATION_ID:#010x})")
    why = _describe_foreign(path, result_tables)
    if why is not None:
        raise StoreError(f"{refuse}: {why}")
    return "unmarked"


def user_version(path: Path) -> int:
    """The schema version the header records (0 for a store written before the marker)."""
    return _header_int(header(path), _USER_VERSION_AT)


def connect(path: Path, mode: OpenMode) -> sqlite3.Connection:
    """A connection to the store file at ``path`` (already recognised by :func:`recognise`).

    ``read`` opens it read-only, never creating it; where SQLite cannot open it so (a WAL store
    on a read-only folder, whose shared-memory file cannot be made) it is read as immutable,
    which is exact when nothing writes it, and nothing can on a read-only folder. ``write`` opens
    an existing file; ``create`` may make it."""
    # isolation_level=None: transactions are opened explicitly (BEGIN IMMEDIATE) so that their
    # bounds are exactly the unit's, and the write lock is taken up front rather than upgraded
    # later, which in WAL mode fails immediately instead of waiting.
    kw = {"timeout": 30, "isolation_level": None, "check_same_thread": False}
    if mode == "create":
        return sqlite3.connect(path, **kw)  # type: ignore[arg-type]
    uri = path.absolute().as_uri()
    if mode == "write":
        return sqlite3.connect(f"{uri}?mode=rw", uri=True, **kw)  # type: ignore[arg-type]
    con = sqlite3.connect(f"{uri}?mode=ro", uri=True, **kw)  # type: ignore[arg-type]
    try:
        con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:
        con.close()
        con = sqlite3.connect(_immutable_uri(path), uri=True, **kw)  # type: ignore[arg-type]
    return con


def stamp(con: sqlite3.Connection, schema_version: int) -> None:
    """Write the marker into a store this process may write (a new one, or one written before
    the marker): its application id and schema version."""
    row = con.execute("PRAGMA application_id").fetchone()
    if row is None or int(row[0]) != APPLICATION_ID:
        con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    row = con.execute("PRAGMA user_version").fetchone()
    if row is None or int(row[0]) < schema_version:
        con.execute(f"PRAGMA user_version = {int(schema_version)}")


def table_columns(con: sqlite3.Connection, tables: Iterable[str]) -> dict[str, set[str]]:
    """The columns each of ``tables`` has in the store (a table it lacks is left out): a store of
    an older schema version, opened read-only and so never migrated, lacks the newer columns."""
    names = {str(r[0]) for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    # PRAGMA table_info takes no bound parameter; the names are the schema's own, never user text.
    return {t: {str(r[1]) for r in con.execute(f"PRAGMA table_info({t})")} for t in tables if t in names}
