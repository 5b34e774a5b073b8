"""interp-workbench: find the parts of a language model that carry memory, with causal evidence.

The package's rooms:

- ``interp.model``: loading, the architecture layout, hook backends, sites, interventions;
- ``interp.patching``: the batched patching engine (sweeps, metrics, planning, execution) and
  attribution patching;
- ``interp.runs``: detector configs and registry, the runner, the results store, executors;
- ``interp.stats``: intervals with their n, top sets against random draws, the three verdicts;
- the front: ``interp.cli`` (the ``interp`` command), ``interp.result_text`` (what it prints of a
  run), ``interp.options``, ``interp.figures``.

Nothing in ``interp`` imports its plug-ins (``circuits``, ``app``): they register through the
``interp.plugins`` entry point. This module is the public API for notebooks and scripts.
"""

from __future__ import annotations

from interp.errors import UserError
from interp.model.interventions import (
    AblateHeads,
    AddNoise,
    Intervention,
    Knockout,
    Patch,
    ScaleValue,
    UniformAttention,
    ablate_heads,
)
from interp.model.layout import ModelInfo
from interp.model.load import load_model
from interp.model.loaded import LoadedModel, Provenance
from interp.model.pruned import save_pruned
from interp.runs import tables
from interp.runs.heads import RankedHeads, heads

__version__ = "0.1.0"

__all__ = [
    "AblateHeads",
    "AddNoise",
    "Intervention",
    "Knockout",
    "LoadedModel",
    "ModelInfo",
    "Patch",
    "Provenance",
    "RankedHeads",
    "ScaleValue",
    "UniformAttention",
    "UserError",
    "ablate_heads",
    "heads",
    "load_model",
    "save_pruned",
    "tables",
]


