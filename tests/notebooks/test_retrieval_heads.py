"""The retrieval-heads notebook runs end to end on the default model."""

from __future__ import annotations

import pytest

from tests.nbrun import run_notebook

pytestmark = pytest.mark.notebooks


def test_retrieval_heads_notebook() -> None:
    nb = run_notebook("retrieval_heads.ipynb")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "counted" in text
