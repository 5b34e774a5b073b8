"""The patching engine: sweeps as data (``sweeps``), metrics (``metrics``), memory budgets
(``memory``), planning (``planning``), the forward passes and their sources (``forwards``,
``sources``), execution (``execution``), and attribution patching (``attribution``).

May import ``interp.model`` and ``interp.errors``; never ``interp.runs`` or the front.
The names below are its public API.
"""

from interp.patching.execution import execute_plan, run_sweep
from interp.patching.memory import activation_bytes, bytes_per_row, default_budget, units_within
from interp.patching.metrics import LogitDiff, LogProb, Metric, Prob
from interp.patching.planning import SweepPlan, plan_sweep
from interp.patching.sweeps import Sweep, SweepResult, window_layers

__all__ = [
    "LogProb",
    "LogitDiff",
    "Metric",
    "Prob",
    "Sweep",
    "SweepPlan",
    "SweepResult",
    "activation_bytes",
    "bytes_per_row",
    "default_budget",
    "execute_plan",
    "plan_sweep",
    "run_sweep",
    "units_within",
    "window_layers",
]
