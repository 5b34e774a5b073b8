"""Path patching between components as a detector: every sender into each receiver, exactly.

Given a clean prompt and a corrupt prompt of equal token length (or a circuit task's pairs,
:mod:`circuits.methods.circuit_tasks`), each edge (sender -> receiver) is patched alone with
:func:`interp.patching.path_patch`: in ``direct`` mode the receiver reads its live input plus
the sender's corrupt-minus-clean output, norms recomputed; in ``frozen`` mode Wang et al.'s
(2022, appendix B) two passes. An edge's score is the mean over prompts of m(patched) -
m(clean); the metric is log p(answer's first token) at the last position (as causal tracing),
or the logit difference answer - corrupt answer (Wang et al. 2022).

Intervals (95 %, over prompt pairs; :mod:`interp.patching.intervals`): an edge's score is a
plain mean of per-pair differences m(patched) - m(clean), not normalised by the gap, so it gets
Student's paired t interval on those differences (the edge's ``lo``, ``hi``, ``n``, ``method``);
``clean_metric`` and ``corrupt_metric`` get t intervals, ``gap`` the paired t interval, and
``strongest_score`` its edge's interval (``Summary.intervals``). The per-pair m(clean) and
m(corrupt) are stored by every unit (``unit_pairs``) so that the summary computes them from the
store.

Units are receivers: each unit is one receiver with every sender as the rows of one batched
sweep, committed on its own, so an interrupted run resumes at the next receiver and a run can
be spread over workers by receivers. The edges are stored in the ``edges`` artifact
(:mod:`circuits.methods.edge_records`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd

from circuits.methods.circuit_tasks import TaskPairs, task_pairs
from circuits.methods.edge_records import edge_record, interval_fields
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.patching import (
    LogitDiff,
    PairRuns,
    Sender,
    answer_metric,
    encode_pair,
    gap_intervals,
    pair_runs,
    path_patch,
    senders_before,
)
from interp.patching.edges import check_pairs, parse_receivers, parse_senders
from interp.patching.intervals import LEVEL
from interp.patching.metrics import Metric
from interp.runs import tables
from interp.runs.config import SEED_MAX, DetectorConfig, param
from interp.runs.registry import Detector, Summary, UnitResult, register
from interp.runs.units import Unit
from interp.stats import Interval

UNIT_EDGES, UNIT_PAIRS = "unit_edges", "unit_pairs"
# An edge whose |score| is below this share of |m(clean) - m(corrupt)| is not named as strongest.
EMPTY_GAP = 1e-6


@dataclass(frozen=True)
class PairTaskConfig(DetectorConfig):
    """The prompt pairs and the metric shared by the path-patching and circuit detectors."""

    n_prompts: int = param(8, "prompt pairs of a task (induction, fact, needle, conflict)", low=1)
    seq_len: int = param(20, "induction: length of the random block", low=2)
    context_tokens: int = param(150, "needle: tokens of filler and needle around the question", low=16)
    seed: int = param(0, "seed of the random tokens (induction, needle corruption, conflict draw)", low=0,
                      high=SEED_MAX)
    facts: str = param("auto", "facts of the fact and conflict tasks: auto (the shipped file), builtin, or a path")
    memory_mb: float = param(512.0, "memory budget of one batched pass", low=0, low_open=True)

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_mb * 2**20)


@dataclass(frozen=True)
class PathPatchingConfig(PairTaskConfig):
    """Parameters of path patching (each field's help says what it is)."""

    prompt: str = param("", "the clean prompt (with corrupt_prompt and answer), or give task")
    corrupt_prompt: str = param("", "the corrupt prompt, of the clean prompt's token length")
    answer: str = param("", "the answer whose first token's log-probability is the metric")
    corrupt_answer: str = param("", "metric logit-diff: the answer the corrupt prompt points to")
    task: Literal["auto", "prompts", "induction", "fact", "needle", "conflict"] = param(
        "auto", "prompts (the three above) or a circuit task's pairs; auto: the prompts when given, else induction")
    receivers: tuple[str, ...] = param(("logits",), "receivers: logits, q:L.H, k:L.G, v:L.G, kq:L.H, vq:L.H, mlp:L")
    senders: tuple[str, ...] = param((), "senders: embed, L.H, mlp:L (default: every head below the lowest receiver)")
    mode: Literal["direct", "frozen"] = param("direct", "direct (receiver input += sender's change) or frozen "
                                              "(Wang et al. 2022)")
    metric: Literal["logprob", "logit-diff"] = param("logprob", "log p(answer) at the last position, or "
                                                     "logit(answer) - logit(corrupt answer)")

    @property
    def pairs_from(self) -> str:
        """Where the pairs come from: ``prompts`` or a task's name (``auto`` resolved)."""
        if self.task != "auto":
            return self.task
        given = any(getattr(self, n).strip() for n in ("prompt", "corrupt_prompt", "answer", "corrupt_answer"))
        return "prompts" if given else "induction"

    def check(self) -> None:
        recv = parse_receivers(self.receivers)
        if self.senders:
            check_pairs(parse_senders(self.senders), recv)
        if self.pairs_from == "prompts":
            missing = [n for n in ("prompt", "corrupt_prompt", "answer") if not getattr(self, n).strip()]
            if missing:
                raise UserError(f"path-patching needs --{missing[0].replace('_', '-')} (or a --task)")
            if self.metric == "logit-diff" and not self.corrupt_answer.strip():
                raise UserError("metric logit-diff needs --corrupt-answer")
        elif any(getattr(self, n) for n in ("prompt", "corrupt_prompt", "answer", "corrupt_answer")):
            raise UserError(f"give --task {self.task} or the prompts, not both")


def prompt_pairs(model: LoadedModel, cfg: PathPatchingConfig) -> TaskPairs:
    """The clean and corrupt tokens and answers of a run (its prompts, or its task's pairs)."""
    task = cfg.pairs_from
    if task != "prompts":
        return task_pairs(model, task, cfg.n_prompts, cfg.seq_len if task == "induction" else cfg.context_tokens,
                          cfg.seed, cfg.facts)
    from circuits.data.facts import answer_tokens

    clean, corrupt = encode_pair(model, cfg.prompt, cfg.corrupt_prompt)
    wrong = (answer_tokens(model, cfg.corrupt_answer)[0],) if cfg.corrupt_answer.strip() else (-1,)
    return TaskPairs(clean, corrupt, (answer_tokens(model, cfg.answer)[0],), wrong, ("prompt",))


def task_metric(pairs: TaskPairs, metric: str) -> Metric:
    """log p(answer's first token) or logit(answer) - logit(corrupt answer), at the last position."""
    if metric == "logit-diff":
        return LogitDiff(list(pairs.answers), list(pairs.corrupt_answers))
    return answer_metric(list(pairs.answers))


def runs_of(model: LoadedModel, pairs: TaskPairs, metric: str) -> PairRuns:
    return pair_runs(model, pairs.clean, pairs.corrupt, task_metric(pairs, metric))


def default_senders(model: LoadedModel, cfg: PathPatchingConfig) -> tuple[Sender, ...]:
    recv = parse_receivers(cfg.receivers)
    if cfg.senders:
        return parse_senders(cfg.senders)
    senders = senders_before(model.info, recv, kinds=("head",))
    if not senders:
        raise UserError(f"no head is below the lowest receiver of {', '.join(r.name for r in recv)}: "
                        "give --senders (embed reaches every receiver)")
    return senders


def gap_metrics(runs: PairRuns) -> dict[str, float]:
    clean, corrupt = float(runs.clean_metric.mean()), float(runs.corrupt_metric.mean())
    return {"clean_metric": clean, "corrupt_metric": corrupt, "gap": clean - corrupt, "map_error": runs.map_error}


def pairs_artifact(runs: PairRuns) -> pd.DataFrame:
    """The per-pair m(clean) and m(corrupt) a summary's intervals are computed from."""
    return tables.artifact(UNIT_PAIRS, {"clean": runs.clean_metric.tolist(), "corrupt": runs.corrupt_metric.tolist()})


def stored_gap_intervals(artifacts: pd.DataFrame, name: str = UNIT_PAIRS) -> dict[str, Interval]:
    """``clean_metric``, ``corrupt_metric`` and ``gap`` with their intervals, from the first
    stored per-pair document ``name`` (none where no unit stored one: a run begun before
    intervals were stored)."""
    docs = unit_docs(artifacts, name)
    return gap_intervals(docs[0][1]["clean"], docs[0][1]["corrupt"]) if docs else {}


def unit_docs(artifacts: pd.DataFrame, name: str) -> list[tuple[str, Any]]:
    """(unit, document) of each stored artifact ``name``, in row order (the runner's unit order)."""
    import json

    if not len(artifacts):
        return []
    rows = artifacts[artifacts["name"] == name]
    return [(str(u), json.loads(doc)) for u, doc in zip(rows["unit"], rows["json"], strict=True)]


def unit_metric(results: Mapping[str, pd.DataFrame], name: str) -> float | None:
    m = results.get("metrics")
    if m is None or not len(m):
        return None
    vals = m.loc[m["name"] == name, "value"].to_numpy(float)
    return float(vals[0]) if len(vals) else None


def edge_interval(edge: Mapping[str, Any]) -> Interval:
    """A stored edge's score with its interval (nan bounds where stored null)."""
    def bound(x: float | None) -> float:
        return math.nan if x is None else float(x)

    return Interval(float(edge["score"]), bound(edge["lo"]), bound(edge["hi"]), int(edge["n"]), str(edge["method"]),
                    LEVEL)


def strongest(edges: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [e for e in edges if e["score"] is not None]
    return max(scored, key=lambda e: abs(e["score"])) if scored else None


@register
class PathPatchingDetector(Detector[PathPatchingConfig]):
    name = "path-patching"
    description = "Exact path patching of every sender into each receiver (direct, or frozen as Wang et al. 2022)"
    output = "edges"
    Config = PathPatchingConfig

    def variant(self, cfg: PathPatchingConfig) -> str:
        ungrouped = any(r.ungrouped for r in parse_receivers(cfg.receivers))
        return cfg.mode + (".ungrouped" if ungrouped else "")

    def method_text(self, cfg: PathPatchingConfig) -> str:
        how = ("each receiver reads its live input plus the sender's corrupt-minus-clean output, norms "
               "recomputed" if cfg.mode == "direct" else "Wang et al. (2022, appendix B): every other head "
               "frozen to the clean run, the sender corrupt, the receivers' inputs cached, then only them patched")
        what = "log p(answer's first token)" if cfg.metric == "logprob" else "logit(answer) - logit(corrupt answer)"
        return f"exact path patching, {cfg.mode}: {how}; score = mean over prompts of the change of {what}"

    def pairs(self, model: LoadedModel, cfg: PathPatchingConfig) -> TaskPairs:
        return self.memo("pairs", model, cfg, lambda: prompt_pairs(model, cfg))

    def runs(self, model: LoadedModel, cfg: PathPatchingConfig) -> PairRuns:
        return self.memo("runs", model, cfg, lambda: runs_of(model, self.pairs(model, cfg), cfg.metric))

    def units(self, model: LoadedModel, cfg: PathPatchingConfig) -> list[Unit]:
        recv = parse_receivers(cfg.receivers)
        for r in recv:
            r.check(model.info)
        for s in default_senders(model, cfg):
            s.check(model.info)
        self.pairs(model, cfg)  # prompts of unequal token length fail here, before the store
        return [Unit("receiver", i, label=f"into-{r.name}") for i, r in enumerate(recv)]

    def run_unit(self, model: LoadedModel, cfg: PathPatchingConfig, unit: Unit) -> UnitResult:
        receiver = parse_receivers(cfg.receivers)[int(unit.index or 0)]
        runs = self.runs(model, cfg)
        res = path_patch(model, runs, default_senders(model, cfg), [receiver], mode=cfg.mode,
                         budget_bytes=cfg.budget_bytes)
        doc = [{"sender": e.sender.name, "receiver": e.receiver.name, "score": score, **interval_fields(iv)}
               for (e, score), iv in zip(res.edge_effects(), res.effect_intervals(), strict=True)]
        arts = pd.concat([tables.artifact(UNIT_EDGES, doc), pairs_artifact(runs)], ignore_index=True)
        return UnitResult(tables={"artifacts": arts, "metrics": tables.metrics(gap_metrics(runs), n=runs.n_prompts)})

    def finalize(self, model: LoadedModel, cfg: PathPatchingConfig, results: Mapping[str, pd.DataFrame]) -> Summary:
        edges = [edge_record(e["sender"], e["receiver"], e["score"], None, False, e)
                 for _, doc in unit_docs(results["artifacts"], UNIT_EDGES) for e in doc]
        intervals = stored_gap_intervals(results["artifacts"])
        metrics: dict[str, Any] = {k: unit_metric(results, k) for k in ("clean_metric", "corrupt_metric", "gap")}
        metrics.update(n_edges=len(edges), n_receivers=len(cfg.receivers), mode=cfg.mode, metric=cfg.metric,
                       task=cfg.pairs_from, group_size=model.info.group_size)
        best = strongest(edges)
        warnings = []
        if best is not None:
            metrics.update(strongest_edge=f"{best['sender']}->{best['receiver']}", strongest_score=best["score"])
            if best["n"] is not None:
                intervals["strongest_score"] = edge_interval(best)
        if metrics["gap"] is not None and abs(metrics["gap"]) < EMPTY_GAP:
            warnings.append("the clean and corrupt prompts give the same metric: every edge scores about zero")
        return Summary(metrics=metrics, intervals=intervals, edges=edges, warnings=warnings,
                       tables={"artifacts": tables.artifact("edges", edges),
                               "metrics": tables.metrics(metrics, n=1)})
