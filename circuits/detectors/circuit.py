"""A task's circuit as a scored graph: edge attribution, exact confirmation, faithfulness.

For a task's clean / corrupt pairs (:mod:`circuits.methods.circuit_tasks`: induction, a known
fact, a needle, a knowledge conflict) and the model's graph (every sender and receiver,
:func:`interp.patching.full_graph`):

1. EAP-IG (Hanna et al. 2024; or EAP, Syed et al. 2023) scores every edge at once;
2. the ``top_n`` edges by |attribution| are patched exactly (:func:`interp.patching.path_patch`,
   ``direct`` or ``frozen``), and the Spearman rank correlation of attribution and exact effect
   on that set is reported;
3. the circuit is the confirmed edges whose |exact effect| reaches ``rel_threshold`` of
   |m(clean) - m(corrupt)|, pruned to those on a path from ``embed`` to the logits
   (:func:`interp.patching.build_circuit`);
4. its faithfulness (the share of m(clean) - m(corrupt) a run with every other edge corrupt
   recovers) is compared with ``draws`` seeded random circuits of its size
   (:func:`interp.patching.faithfulness`).

Intervals (95 %, over prompt pairs; :mod:`interp.patching.intervals`): a confirmed edge's exact
score is a plain mean of per-pair differences m(patched) - m(clean), so it gets Student's paired
t interval (the edge's ``lo``, ``hi``, ``n``, ``method``); ``faithfulness`` is a ratio of means,
(m(C) - m(corrupt)) / (m(clean) - m(corrupt)), so it gets a BCa bootstrap over pairs, each
resample drawing whole pairs (a pair's m(C), m(clean) and m(corrupt) together), 9,999
resamples seeded with the run's ``seed``; ``clean_metric``, ``corrupt_metric`` and
``circuit_metric`` get t intervals and ``gap`` the paired t interval. The faithfulness of the
random circuits stays a distribution the circuit's percentile is read against. The
faithfulness unit stores the per-pair m(clean), m(corrupt) and m(C) the summary computes these
from.

The metric defaults to the logit difference answer - corrupt answer (Wang et al. 2022): the
log-probability saturates on answers the model is sure of (docs/path_patching.md, caveats).

Units: ``attribution``; ``confirm-i`` (the top edges' receivers split into ``confirm_units``
contiguous shares, one batched path-patching call per receiver); ``faithfulness``. Each is
committed on its own; a unit that needs an earlier one's result recomputes it when the run
resumes in a new process (the attribution, a confirmation share) and reuses it otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch

from circuits.detectors.path_patching import PairTaskConfig, gap_metrics, runs_of, unit_docs, unit_metric
from circuits.methods.circuit_tasks import TaskPairs, task_pairs
from circuits.methods.edge_records import edge_record, interval_fields
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.patching import (
    Confirmation,
    EdgeScores,
    Graph,
    PairRuns,
    build_circuit,
    edge_attribution,
    effect_interval,
    faithfulness,
    faithfulness_interval,
    full_graph,
    gap_intervals,
)
from interp.patching.attribution import spearman
from interp.patching.edge_attribution import exact_edge_values
from interp.patching.edges import Edge, Receiver
from interp.runs import tables
from interp.runs.config import MAX_DRAWS, param
from interp.runs.registry import Detector, Summary, UnitResult, register
from interp.runs.units import Part, Unit
from interp.stats import Interval, mean_interval

UNIT_ATTRIBUTION, UNIT_CONFIRMED, UNIT_CIRCUIT = "unit_attribution", "unit_confirmed", "unit_circuit"


@dataclass(frozen=True)
class CircuitConfig(PairTaskConfig):
    """Parameters of a circuit run (each field's help says what it is)."""

    task: Literal["induction", "fact", "needle", "conflict"] = param("induction", "the task whose circuit is drawn")
    metric: Literal["logit-diff", "logprob"] = param("logit-diff", "logit(answer) - logit(corrupt answer), or "
                                                     "log p(answer), at the last position")
    method: Literal["eap-ig", "eap"] = param("eap-ig", "edge attribution: EAP-IG (Hanna et al. 2024) or EAP")
    steps: int = param(5, "EAP-IG: points between the clean and corrupt embeddings", low=1)
    mlps: bool = param(True, "include the MLPs as senders and receivers")
    top_n: int = param(200, "edges by |attribution| confirmed by exact path patching", low=1)
    mode: Literal["direct", "frozen"] = param("direct", "path-patching mode of the confirmation")
    rel_threshold: float = param(0.05, "circuit: |exact effect| >= this x |m(clean) - m(corrupt)|", low=0)
    draws: int = param(20, "random circuits of the circuit's size to compare with", low=1, high=MAX_DRAWS)
    baseline: Literal["connected", "uniform"] = param("connected", "random circuits grown from the logits, or "
                                                      "drawn uniformly")
    confirm_units: int = param(4, "units the confirmation is split into (by receivers)", low=1)
    stored_edges: int = param(1000, "edges stored, by |attribution| (confirmed ones always); 0: every edge", low=0)


def confirm_share(edges: Sequence[Edge], part: Part) -> list[int]:
    """Indices (into ``edges``) of this part's contiguous share of their receivers."""
    receivers = sorted({e.receiver for e in edges}, key=Receiver.sort_key)
    mine = {receivers[i] for i in part.share(len(receivers))}
    return [i for i, e in enumerate(edges) if e.receiver in mine]


@register
class CircuitDetector(Detector[CircuitConfig]):
    name = "circuit"
    description = "A task's circuit: EAP-IG over the graph, top edges confirmed exactly, faithfulness vs random"
    output = "edges"
    Config = CircuitConfig

    def variant(self, cfg: CircuitConfig) -> str:
        method = f"eap-ig.steps-{cfg.steps}" if cfg.method == "eap-ig" else "eap"
        return f"{method}.{cfg.mode}"

    def method_text(self, cfg: CircuitConfig) -> str:
        return (f"{cfg.method} scores of every edge of the {'full' if cfg.mlps else 'attention-only'} graph on the "
                f"{cfg.task} task, the top {cfg.top_n} confirmed by exact path patching ({cfg.mode}); circuit = "
                f"confirmed edges >= {cfg.rel_threshold} x |m(clean) - m(corrupt)| on paths from embed to the "
                f"logits; faithfulness against {cfg.draws} random circuits ({cfg.baseline})")

    # ------------------------------------------------------------------ shared, per run
    def pairs(self, model: LoadedModel, cfg: CircuitConfig) -> TaskPairs:
        length = cfg.seq_len if cfg.task == "induction" else cfg.context_tokens
        return self.memo("pairs", model, cfg, lambda: task_pairs(model, cfg.task, cfg.n_prompts, length, cfg.seed,
                                                                 cfg.facts))

    def runs(self, model: LoadedModel, cfg: CircuitConfig) -> PairRuns:
        return self.memo("runs", model, cfg, lambda: runs_of(model, self.pairs(model, cfg), cfg.metric))

    def graph(self, model: LoadedModel, cfg: CircuitConfig) -> Graph:
        return full_graph(model.info, mlps=cfg.mlps)

    def scores(self, model: LoadedModel, cfg: CircuitConfig) -> EdgeScores:
        return self.memo("scores", model, cfg, lambda: edge_attribution(
            model, self.runs(model, cfg), self.graph(model, cfg), method=cfg.method, steps=cfg.steps,
            budget_bytes=cfg.budget_bytes, progress=True))

    def top_edges(self, model: LoadedModel, cfg: CircuitConfig) -> tuple[Edge, ...]:
        s = self.scores(model, cfg)
        return tuple(s.edges[i] for i in s.top(cfg.top_n))

    def confirmed(self, model: LoadedModel, cfg: CircuitConfig, i: int) -> tuple[list[int], torch.Tensor]:
        """Share ``i``: indices into the top edges and their exact values [edges, prompts]."""
        def compute() -> tuple[list[int], torch.Tensor]:
            top = self.top_edges(model, cfg)
            idx = confirm_share(top, Part(Unit("confirm", i), i, cfg.confirm_units))
            values = exact_edge_values(model, self.runs(model, cfg), [top[j] for j in idx], mode=cfg.mode,
                                       budget_bytes=cfg.budget_bytes, progress=True)
            return idx, values

        return self.memo(f"confirm-{i}", model, cfg, compute)

    # ------------------------------------------------------------------ units
    def units(self, model: LoadedModel, cfg: CircuitConfig) -> list[Unit]:
        runs = self.runs(model, cfg)  # a task the model cannot do fails here, before the store
        if abs(runs.gap) < 1e-9 * max(1.0, abs(float(runs.clean_metric.mean()))):
            raise UserError(f"the {cfg.task} task's clean and corrupt prompts give the same {cfg.metric} on "
                            f"{model.name}: there is no circuit to find")
        return [Unit("attribution"), *(Unit("confirm", i) for i in range(cfg.confirm_units)), Unit("faithfulness")]

    def run_unit(self, model: LoadedModel, cfg: CircuitConfig, unit: Unit) -> UnitResult:
        runs = self.runs(model, cfg)
        if unit.group == "attribution":
            s = self.scores(model, cfg)
            doc = {"variant": s.variant, "scores": s.scores.tolist()}
            metrics = {**gap_metrics(runs), "n_graph_edges": len(s.edges)}
            return UnitResult(tables={"artifacts": tables.artifact(UNIT_ATTRIBUTION, doc),
                                      "metrics": tables.metrics(metrics, n=runs.n_prompts)})
        if unit.group == "confirm":
            top = self.top_edges(model, cfg)
            idx, values = self.confirmed(model, cfg, int(unit.index or 0))
            exact = (values - runs.clean_metric[None]).mean(dim=1)
            doc = [{"sender": top[j].sender.name, "receiver": top[j].receiver.name, "exact": float(exact[k]),
                    **interval_fields(effect_interval(values[k], runs.clean_metric))} for k, j in enumerate(idx)]
            return UnitResult(tables={"artifacts": tables.artifact(UNIT_CONFIRMED, doc)})
        return self._faithfulness_unit(model, cfg, runs)

    def _faithfulness_unit(self, model: LoadedModel, cfg: CircuitConfig, runs: PairRuns) -> UnitResult:
        top, scores = self.top_edges(model, cfg), self.scores(model, cfg)
        values = torch.empty(len(top), runs.n_prompts, dtype=torch.float64)
        for i in range(cfg.confirm_units):
            idx, vals = self.confirmed(model, cfg, i)
            values[idx] = vals
        estimate = scores.scores[scores.top(cfg.top_n)]
        exact = (values - runs.clean_metric[None]).mean(dim=1)
        conf = Confirmation(scores, top, estimate, values, runs.clean_metric, runs.corrupt_metric, cfg.mode,
                            spearman(estimate, exact))
        circuit = build_circuit(conf, model.info, rel_threshold=cfg.rel_threshold)
        faith = faithfulness(model, runs, circuit, self.graph(model, cfg), draws=cfg.draws, seed=cfg.seed,
                             baseline=cfg.baseline, budget_bytes=cfg.budget_bytes, progress=True)
        rand = faith.random
        doc = {"edges": circuit.names(), "threshold": circuit.threshold, "faithfulness": faith.value,
               "circuit_metric": faith.circuit_metric, "random": rand.tolist(), "percentile": faith.percentile,
               "clean": runs.clean_metric.tolist(), "corrupt": runs.corrupt_metric.tolist(),
               "circuit": faith.per_prompt.tolist()}
        metrics = {"faithfulness": faith.value, "circuit_metric": faith.circuit_metric,
                   "random_faithfulness_mean": float(rand.mean()), "random_faithfulness_max": float(rand.max()),
                   "faithfulness_percentile": faith.percentile, "threshold": circuit.threshold,
                   "n_circuit_edges": len(circuit.edges)}
        return UnitResult(tables={"artifacts": tables.artifact(UNIT_CIRCUIT, doc),
                                  "metrics": tables.metrics(metrics, n=runs.n_prompts)})

    # ------------------------------------------------------------------ summary
    def finalize(self, model: LoadedModel, cfg: CircuitConfig, results: Mapping[str, pd.DataFrame]) -> Summary:
        arts = results["artifacts"]
        attribution = torch.tensor(unit_docs(arts, UNIT_ATTRIBUTION)[0][1]["scores"], dtype=torch.float64)
        graph_edges = self.graph(model, cfg).edges
        if len(graph_edges) != len(attribution):
            raise UserError("the stored attribution does not match this model's graph")
        exact = {(d["sender"], d["receiver"]): d for _, doc in unit_docs(arts, UNIT_CONFIRMED) for d in doc}
        circ = unit_docs(arts, UNIT_CIRCUIT)[0][1]
        kept = set(circ["edges"])
        order = attribution.abs().argsort(descending=True, stable=True).tolist()
        n_keep = len(order) if cfg.stored_edges == 0 else cfg.stored_edges
        edges = []
        for rank, i in enumerate(order):
            e = graph_edges[i]
            key = (e.sender.name, e.receiver.name)
            if rank < n_keep or key in exact:
                d = exact.get(key)
                score = None if d is None else d["exact"]
                edges.append(edge_record(*key, score, float(attribution[i]), e.name in kept, d))
        confirmed = [e for e in edges if e["score"] is not None]
        rho = spearman(torch.tensor([e["attribution"] for e in confirmed], dtype=torch.float64),
                       torch.tensor([e["score"] for e in confirmed], dtype=torch.float64))
        metrics: dict[str, Any] = {k: unit_metric(results, k) for k in (
            "clean_metric", "corrupt_metric", "gap", "faithfulness", "random_faithfulness_mean",
            "random_faithfulness_max", "faithfulness_percentile", "threshold", "n_circuit_edges", "n_graph_edges")}
        metrics.update(spearman=rho, n_confirmed=len(confirmed), n_edges=len(edges), task=cfg.task,
                       metric=cfg.metric, method=cfg.method)
        warnings = []
        if not kept:
            warnings.append("no confirmed edge reaches the threshold on a path to the logits: the circuit is empty "
                            "(a saturated metric? see docs/path_patching.md)")
        intervals = circuit_intervals(circ, cfg.seed)
        gap = intervals.get("gap")
        if gap is not None and gap.contains(0.0):
            warnings.append(f"the 95% interval of the gap m(clean) - m(corrupt) contains 0 ([{gap.lo:.3g}, "
                            f"{gap.hi:.3g}], n={gap.n}): faithfulness, a share of that gap, is not pinned down")
        return Summary(metrics=metrics, intervals=intervals, edges=edges, warnings=warnings,
                       tables={"artifacts": tables.artifact("edges", edges), "metrics": tables.metrics(metrics, n=1)})


def circuit_intervals(doc: Mapping[str, Any], seed: int) -> dict[str, Interval]:
    """The intervals of the faithfulness unit's numbers, from its per-pair values (none for a
    unit stored before they were: the run's metrics then stand without intervals)."""
    if "circuit" not in doc:
        return {}
    out = gap_intervals(doc["clean"], doc["corrupt"])
    out["circuit_metric"] = mean_interval(doc["circuit"])
    out["faithfulness"] = faithfulness_interval(doc["circuit"], doc["clean"], doc["corrupt"], seed=seed)
    return out
