"""Execute a notebook end to end (the notebook tier of the tests)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def run_notebook(name: str, timeout: int = 900) -> nbformat.NotebookNode:
    """Run notebooks/<name> in a fresh kernel from the repo root; raise on any cell error."""
    path = ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb
