"""Execute the scripted-pruning notebook end to end on smollm2-135m: heads from a stored run, the
pruned folder scored by plain transformers in a fresh process, DeCoRe on a plain model object."""

from __future__ import annotations

import os

import pytest

from tests.nbrun import run_notebook

pytestmark = pytest.mark.notebooks


def test_scripted_pruning_notebook_runs() -> None:
    if os.environ.get("INTERP_SKIP_INTEGRATION"):
        pytest.skip("INTERP_SKIP_INTEGRATION is set")
    # A cell runs conflict-heads on 40 items: minutes on 2 free cores, more on a shared machine.
    nb = run_notebook("scripted_pruning.ipynb", timeout=1800)
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "memory heads: " in outputs
    assert "modules of interp imported there: 0" in outputs
    # The saved folder, scored by plain transformers, gives run-time pruning's top-1 tokens.
    assert "top-1 equal to run-time pruning: {'unpruned': 40, 'pruned': 40} of 40 prompts each" in outputs
    assert "DeCoRe-entropy, top-10 retrieval heads" in outputs
    assert "DeCoRe on the plain model equals DeCoRe on the LoadedModel on 40 of 40 prompts" in outputs
