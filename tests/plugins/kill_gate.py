"""A detector for tests that stop a run mid-unit: the induction detector whose unit
``gate_unit`` says when it starts and then waits to be killed, so that a test kills the process
computing it on that event, not at a moment chosen by polling.

On its first attempt the unit creates ``<gate>/<unit>.started`` (exclusively, holding the process
id that computes it), then sleeps until the process is killed (or ``hold_s`` passes, then it
fails). A later attempt, in a resumed run or on another worker, finds the file and computes the
unit normally: its numbers are the induction detector's. Registered through an entry point
(``kill-gate = tests.plugins.kill_gate``), like any plug-in; with ``gate`` empty it is the induction
detector under another name.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from circuits.detectors.induction import InductionConfig, InductionDetector
from interp.model.loaded import LoadedModel
from interp.runs.config import param
from interp.runs.registry import UnitResult, register
from interp.runs.units import Unit


@dataclass(frozen=True)
class GatedConfig(InductionConfig):
    gate: str = param("", "folder of the gate files (empty: no gate)")
    gate_unit: str = param("batch-1", "the unit that waits to be killed on its first attempt")
    hold_s: float = param(600.0, "how long the gated unit waits before it fails", low=0.0)


@register
class GatedInduction(InductionDetector):
    name = "gated-induction"
    description = "the induction detector, whose gate_unit waits to be killed on its first attempt (tests)"
    Config = GatedConfig  # type: ignore[assignment]

    def run_unit(self, model: LoadedModel, cfg: GatedConfig, unit: Unit) -> UnitResult:  # type: ignore[override]
        if cfg.gate and unit.key == cfg.gate_unit:
            try:
                fd = os.open(Path(cfg.gate) / f"{unit.key}.started", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass  # not the first attempt: compute
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                time.sleep(cfg.hold_s)
                raise RuntimeError(f"unit {unit} was not killed within {cfg.hold_s} s")
        return super().run_unit(model, cfg, unit)
