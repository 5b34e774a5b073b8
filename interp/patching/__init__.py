"""The patching engine: sweeps as data (``sweeps``), metrics (``metrics``), memory budgets
(``memory``), planning (``planning``), the forward passes and their sources (``forwards``,
``sources``), execution (``execution``), and attribution patching (``attribution``).

Path patching between components: edges as data (``edges``), the clean and corrupt runs
(``pairs``), senders' and receivers' maps (``senders``, ``receivers``, ``taps``), exact path
patching (``paths``), EAP / EAP-IG with exact confirmation (``edge_attribution``), circuits and
their faithfulness (``faithfulness``), the intervals of their numbers over prompt pairs
(``intervals``).

May import ``interp.model``, ``interp.stats`` and ``interp.errors``; never ``interp.runs`` or the front.
The names below are its public API.
"""

from interp.patching.edge_attribution import Confirmation, EdgeScores, confirm_edges, edge_attribution
from interp.patching.edges import (
    Edge,
    Graph,
    Receiver,
    Sender,
    full_graph,
    parse_edge,
    parse_receiver,
    parse_sender,
    senders_before,
)
from interp.patching.execution import execute_plan, run_sweep
from interp.patching.faithfulness import Circuit, Faithfulness, build_circuit, circuit_values, faithfulness
from interp.patching.intervals import effect_interval, faithfulness_interval, gap_intervals
from interp.patching.memory import activation_bytes, bytes_per_row, default_budget, units_within
from interp.patching.metrics import LogitDiff, LogProb, Metric, Prob
from interp.patching.pairs import PairRuns, answer_metric, encode_pair, pair_runs
from interp.patching.paths import PathResult, path_patch
from interp.patching.planning import SweepPlan, plan_sweep
from interp.patching.sweeps import Sweep, SweepResult, window_layers

__all__ = [
    "Circuit",
    "Confirmation",
    "Edge",
    "EdgeScores",
    "Faithfulness",
    "Graph",
    "LogProb",
    "LogitDiff",
    "Metric",
    "PairRuns",
    "PathResult",
    "Prob",
    "Receiver",
    "Sender",
    "Sweep",
    "SweepPlan",
    "SweepResult",
    "activation_bytes",
    "answer_metric",
    "build_circuit",
    "bytes_per_row",
    "circuit_values",
    "confirm_edges",
    "default_budget",
    "edge_attribution",
    "effect_interval",
    "encode_pair",
    "execute_plan",
    "faithfulness",
    "faithfulness_interval",
    "full_graph",
    "gap_intervals",
    "pair_runs",
    "parse_edge",
    "parse_receiver",
    "parse_sender",
    "path_patch",
    "plan_sweep",
    "run_sweep",
    "senders_before",
    "units_within",
    "window_layers",
]
