"""What a run is, as the store's key: the model's weights, prompt prefix and dtype, the detector,
its variant and parameters, the data and the seed (:func:`run_key`), in canonical JSON; and the
code version stored beside each run."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tomllib
from collections.abc import Mapping
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from interp.errors import UserError

PACKAGE_NAME = "interp-workbench"


def json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable: {value!r}")


def canonical_json(value: Any, what: str) -> str:
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=json_default
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"{what} must be JSON-serialisable: {exc}") from None


def run_key(
    *,
    model: str,
    model_hash: str | None,
    detector: str,
    variant: str,
    params: Mapping[str, Any],
    dataset_hash: str | None,
    seed: int | None,
    prefix: Mapping[str, Any] | None = None,
    dtype: str | None = None,
) -> str:
    """The identity of a run: sha256 of the canonical JSON of what determines its results.

    The model hash is preferred to the name so that a renamed or re-downloaded copy of the same
    weights maps to the same key, and changed weights under the same name do not. ``prefix``
    is the prompt prefix (:class:`interp.model.prefix.PromptPrefix` as a dict): it changes every
    raw-text input, so runs made with different prefixes never resume into each other. ``dtype``
    separates bfloat16 or float16 results from float32 ones; float32 (and None) add nothing, so
    the keys of runs stored before dtypes were keyed stay as they were.
    """
    identity: list[Any] = [model_hash or model, detector, variant, dict(params), dataset_hash, seed, prefix]
    precision = str(dtype or "float32").removeprefix("torch.")
    if precision != "float32":
        identity.append(precision)
    return hashlib.sha256(canonical_json(identity, "params").encode()).hexdigest()


def key_context(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """What of a model's provenance enters a run's key: the prompt prefix and the dtype."""
    return {"prefix": provenance.get("prefix"), "dtype": provenance.get("dtype")}


def _package_version() -> str:
    try:
        return metadata.version(PACKAGE_NAME)
    except metadata.PackageNotFoundError:
        pass
    # Running from a source tree that was never installed.
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        version = tomllib.loads(pyproject.read_text())["project"]["version"]
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return "0+unknown"
    return str(version)


@lru_cache(maxsize=1)
def code_version() -> str:
    """The package version, plus ``+g<short commit>`` when running from a git checkout."""
    version = _package_version()
    root = Path(__file__).resolve().parents[2]
    # Only our own checkout: an installed package inside some other repository (a user's
    # project with a venv) must not report that repository's commit.
    if not (root / ".git").exists():
        return version
    try:
        proc = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return version
    commit = proc.stdout.strip()
    if proc.returncode != 0 or not commit:
        return version
    return f"{version}+g{commit}"
