"""Execute the knowledge-conflicts notebook end to end on smollm2-135m."""

from __future__ import annotations

import os

import pytest

from tests.nbrun import run_notebook

pytestmark = pytest.mark.notebooks


def test_knowledge_conflicts_notebook_runs() -> None:
    if os.environ.get("INTERP_SKIP_INTEGRATION"):
        pytest.skip("INTERP_SKIP_INTEGRATION is set")
    nb = run_notebook("knowledge_conflicts.ipynb")
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "top memory heads" in outputs
    assert "validation /" in outputs
