from __future__ import annotations

import pytest

from tests.nbrun import run_notebook


@pytest.mark.notebooks
def test_episodic_memory_notebook_runs() -> None:
    nb = run_notebook("episodic_memory.ipynb")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # Every figure cell rendered a plotly figure.
    plotly = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(plotly) == 4
