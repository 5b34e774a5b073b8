"""Validation of dataset files uploaded in the dashboard.

An upload is only ever parsed as text (JSON, JSON Lines or CSV): never executed, imported or
unpickled. It must be small, UTF-8, and a non-empty list of flat records (string keys, scalar
values) with the columns the detector needs; it is then saved under
``<workspace>/uploads/<sha256 prefix>.<ext>`` and passed to the CLI as a path.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from interp.errors import UserError

MAX_BYTES = 5 * 1024 * 1024
MAX_RECORDS = 100_000
EXTENSIONS = ("jsonl", "json", "csv")
UPLOADS_DIR = "uploads"


def parse_records(name: str, data: bytes, *, max_bytes: int = MAX_BYTES) -> list[dict[str, Any]]:
    """The records of an uploaded file; UserError with a one-line reason when it is not valid."""
    ext = Path(name).suffix.lower().lstrip(".")
    if ext not in EXTENSIONS:
        raise UserError(f"{name}: unsupported file type {('.' + ext) if ext else '(none)'}; use .jsonl, .json or .csv")
    if len(data) > max_bytes:
        raise UserError(f"{name}: {len(data) / 1e6:.1f} MB is over the {max_bytes / 1e6:.1f} MB limit")
    if not data.strip():
        raise UserError(f"{name}: the file is empty")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{name}: not UTF-8 text") from None
    records: list[Any]
    if ext == "jsonl":
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise UserError(f"{name}: line {i} is not JSON ({exc.args[0] if exc.args else exc})") from None
    elif ext == "json":
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{name}: not valid JSON ({exc.args[0] if exc.args else exc})") from None
        if not isinstance(doc, list):
            raise UserError(f"{name}: expected a JSON list of records, got {type(doc).__name__}")
        records = doc
    else:
        try:
            records = list(csv.DictReader(io.StringIO(text)))
        except csv.Error as exc:
            raise UserError(f"{name}: not valid CSV ({exc})") from None
    if not records:
        raise UserError(f"{name}: no records")
    if len(records) > MAX_RECORDS:
        raise UserError(f"{name}: {len(records)} records is over the limit of {MAX_RECORDS}")
    for i, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise UserError(f"{name}: record {i} is a {type(rec).__name__}, not an object")
        for key, value in rec.items():
            if not isinstance(key, str):
                raise UserError(f"{name}: record {i} has a column that is not a name: {key!r}")
            if value is not None and not isinstance(value, str | int | float | bool):
                raise UserError(f"{name}: record {i}, column {key!r}: nested values are not allowed")
    return records


def check_columns(name: str, records: Sequence[dict[str, Any]], required: Sequence[str]) -> None:
    for i, rec in enumerate(records, 1):
        for col in required:
            value = rec.get(col)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise UserError(f"{name}: record {i} has no {col!r} (required: {', '.join(required)})")


def required_columns(param_name: str) -> tuple[str, ...]:
    """Columns a dataset parameter needs, by its name (facts files are subject/prompt/answer)."""
    if "fact" in param_name:
        return ("subject", "prompt", "answer")
    return ()


def save_upload(workspace: Path, name: str, data: bytes, required: Sequence[str] = ()) -> Path:
    """Validate and store an upload; the path is content-addressed, so re-uploads are no-ops."""
    records = parse_records(name, data)
    check_columns(name, records, required)
    if {"prompt", "subject"} <= set(required):
        for i, rec in enumerate(records, 1):
            if str(rec["subject"]) not in str(rec["prompt"]):
                raise UserError(f"{name}: record {i}: the subject {rec['subject']!r} is not in the prompt")
    folder = Path(workspace) / UPLOADS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    ext = Path(name).suffix.lower().lstrip(".")
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.{ext}"
    if not path.exists():
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path
