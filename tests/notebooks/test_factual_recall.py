"""Executes notebooks/factual_recall.ipynb end to end on the zoo default."""

from __future__ import annotations

import os

import pytest

from tests.nbrun import run_notebook

pytestmark = pytest.mark.notebooks


def test_factual_recall_notebook_runs() -> None:
    if os.environ.get("INTERP_SKIP_INTEGRATION"):
        pytest.skip("INTERP_SKIP_INTEGRATION is set (the notebook needs the zoo default)")
    nb = run_notebook("factual_recall.ipynb")
    text = "\n".join(
        str(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "p_clean" in text
    assert "peak_layer_mlp_last_subject" in text
    assert "min_layer_subject" in text
