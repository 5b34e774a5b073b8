"""A plug-in head detector for the dashboard's tests, whose units wait at a gate: units before
``open_units`` run at once, the others wait until the file ``gate`` exists. A job running it
stops after committing exactly ``open_units`` of its ``n_units`` units, until the test opens the
gate. Each unit's score of head (l, h) is l + h / 10 (known by hand).

Its name holds words the dashboard once routed runs by ("memory": Conflicts, "trac": Causal
tracing); its declared output, head scores, puts its runs on Head maps alone."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.config import DetectorConfig, param
from interp.runs.registry import Detector, Summary, UnitResult, register
from interp.runs.units import Unit

# How long a closed gate waits before the unit fails (a test that died must not leave a job behind).
GATE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class GatedConfig(DetectorConfig):
    n_units: int = param(5, "units of the run", low=1)
    open_units: int = param(2, "units that run before the gate", low=0)
    gate: str = param("", "the file whose existence opens the gate")


@register
class GatedDetector(Detector[GatedConfig]):
    name = "gated-memory-tracer"
    description = "Units that wait at a gate (a test of the dashboard's progress)"
    output = "head_scores"
    Config = GatedConfig

    def units(self, model: LoadedModel, cfg: GatedConfig) -> list[Unit]:
        return [Unit("unit", i) for i in range(cfg.n_units)]

    def run_unit(self, model: LoadedModel, cfg: GatedConfig, unit: Unit) -> UnitResult:
        if int(unit.index or 0) >= cfg.open_units:
            deadline = time.monotonic() + GATE_TIMEOUT_S
            while not Path(cfg.gate).exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gate {cfg.gate} stayed closed")
                time.sleep(0.05)
        layers, heads = model.info.n_layers, model.info.n_heads
        grid = np.add.outer(np.arange(layers, dtype=float), np.arange(heads, dtype=float) / 10)
        return UnitResult(tables={"head_scores": tables.head_grid("gated", grid)})

    def finalize(self, model: LoadedModel, cfg: GatedConfig, results: Mapping[str, pd.DataFrame]) -> Summary:
        mean = pd.DataFrame(results["head_scores"].groupby(["metric", "layer", "head"], as_index=False)["value"].mean())
        return Summary(tables={"head_scores": mean})
