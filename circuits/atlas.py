"""``interp atlas``: the memory heads of several models side by side, and the papers' claims.

Every (model, detector) pair is run with the detector's scan parameters through one results
store, so a rerun reuses finished runs and resumes unfinished ones. The summary (a pure function
of the runs' :class:`~interp.registry.Summary` objects, :func:`summarize`) places each top head
at its relative depth (layer / n_layers), measures how far the top-k head sets of different
detectors overlap (Jaccard), and checks nine published claims per model (:data:`CLAIMS`):
retrieval heads are sparse and masking them hurts more than masking random heads (Wu et al.
2024), memory and context heads sit in later layers and pruning them moves the rates more than
random pruning (Jin et al. 2024), DeCoRe beats greedy decoding on NQ-Swap-style conflicts
(Gema et al. 2024), the MLP effect at the last subject token peaks in early-to-middle layers
(Meng et al. 2022), CMR-like heads sit in middle-to-late layers (Ji-An et al. 2024), induction
heads exist (Olsson et al. 2022), and the induction top set overlaps the retrieval top set (Wu
et al. 2024 report them distinct).

The thresholds are the detectors' own (induction 0.4, retrieval 0.1, CMR-like distance 0.5) or
stated with the claim (5 %, relative depth 0.5, "more than random"); none is fitted to the results.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from circuits.heads import head_label
from interp.cli import JsonOpt, PrefixOpt, WorkspaceOpt, err, executor_for, model_spec, open_store, out
from interp.errors import UserError
from interp.executors import check_cluster_options
from interp.options import DeviceMapOpt, DeviceOpt, DtypeOpt, MaxMemoryOpt, SchedulerOpt, WorkersOpt
from interp.registry import Summary, all_detectors, command

DEFAULT_DETECTORS = (
    "induction", "copying", "cmr", "retrieval", "retrieval-masking", "conflict-heads", "ph3", "decore-eval",
    "causal-trace", "attention-knockout",
)
# The atlas runs each detector with its scan parameters, overridden here where those take too
# long for four models on a 2-core CPU. Each override is a documented variant or a smaller
# sample, never a changed method, and is stored with the run like any parameter:
# - retrieval ranks by the teacher-forced answer ("fast": one forward pass per sample instead of
#   greedy decoding with attention read at every step) on 12 haystacks instead of 27;
# - retrieval-masking decodes 8 haystacks of up to 600 tokens against 2 random draws;
# - ph3 and decore-eval evaluate fewer items and fewer k (decore-eval: NQ-Swap only);
# - attention-knockout traces 5 facts.
ATLAS_PARAMS: dict[str, dict[str, Any]] = {
    "retrieval": {"mode": "fast", "n_lengths": 2, "n_depths": 2, "n_needles": 3},
    "retrieval-masking": {"n_lengths": 2, "n_depths": 2, "n_needles": 2, "max_length": 600, "n_random": 2,
                          "seed": 1},
    "ph3": {"max_items": 40, "ks": "1,3,5", "scale_heads": 0},
    "decore-eval": {"max_items": 20, "ks": "1,3,10", "tasks": "nqswap"},
    "attention-knockout": {"limit": 5},
}
# Detectors that rank heads by retrieval score get the atlas's retrieval ranking of the same
# model (its "heads" parameter) instead of computing the same scan again. retrieval-masking then
# tests on other haystack windows (seed 1) than the ranking saw (seed 0), as it does on its own.
RANKED_BY_RETRIEVAL = ("retrieval-masking", "decore-eval")
# The head sets whose overlap is measured, in this order: (set name, detector it comes from).
SETS = (("induction", "induction"), ("retrieval", "retrieval"), ("cmr", "cmr"),
        ("memory", "conflict-heads"), ("context", "conflict-heads"))
# Stated with the claims, never fitted: "sparse" as Wu et al. 2024 put it (under 5 % of heads),
# "later" / "middle-to-late" as a mean relative depth past the middle of the stack, "early-to-
# middle" as a relative depth up to it.
SPARSE_SHARE = 0.05
LATE_DEPTH = 0.5
COLUMNS = 80
HOLDS, FAILS, NM = "holds", "does not hold", "not measurable"


# ------------------------------------------------------------------------------ the summary


@dataclass(frozen=True)
class ModelResults:
    """What the atlas knows about one model: its shape and each detector's summary or the reason
    it could not be measured."""

    n_layers: int
    n_heads: int
    summaries: Mapping[str, Summary] = field(default_factory=dict)
    not_measurable: Mapping[str, str] = field(default_factory=dict)


def _scored(heads: Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    """Heads with a numeric score (CMR leaves heads with a flat lag-CRP without one)."""
    return [h for h in heads or [] if isinstance(h.get("score"), int | float)]


def top_sets(res: ModelResults, top: int) -> dict[str, list[Mapping[str, Any]]]:
    """The top-k heads of each head set the model has, best first."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for set_name, det in SETS:
        s = res.summaries.get(det)
        if s is None or not s.heads:
            continue
        heads = _scored(s.heads)
        if set_name in ("memory", "context"):
            heads = [h for h in heads if h.get("kind") == set_name]
        # Memory heads have the largest memory score, context heads the most negative one.
        heads = sorted(heads, key=lambda h: h["score"], reverse=set_name != "context")
        if heads:
            out[set_name] = heads[:top]
    return out


def jaccard(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> float | None:
    sa = {(int(h["layer"]), int(h["head"])) for h in a}
    sb = {(int(h["layer"]), int(h["head"])) for h in b}
    union = sa | sb
    return len(sa & sb) / len(union) if union else None


def _head_rows(heads: Sequence[Mapping[str, Any]], n_layers: int) -> list[dict[str, Any]]:
    return [{"label": head_label(int(h["layer"]), int(h["head"])), "layer": int(h["layer"]),
             "head": int(h["head"]), "relative_depth": int(h["layer"]) / n_layers, "score": float(h["score"])}
            for h in heads]


def _mean_depth(heads: Sequence[Mapping[str, Any]], n_layers: int) -> float | None:
    return sum(int(h["layer"]) for h in heads) / len(heads) / n_layers if heads else None


def _verdict(ok: bool | None, value: Any, detail: str, **extra: Any) -> dict[str, Any]:
    verdict = NM if ok is None else HOLDS if ok else FAILS
    return {"verdict": verdict, "value": value, "detail": detail, **extra}


def _why_missing(res: ModelResults, det: str) -> str:
    if det in res.not_measurable:
        return f"{det}: {res.not_measurable[det]}"
    return f"{det} not run" if det not in res.summaries else f"{det} has no head scores"


def claim_retrieval_sparse(res: ModelResults, top: int) -> dict[str, Any]:
    s = res.summaries.get("retrieval")
    share = s.metrics.get("share_heads_above_threshold") if s is not None else None
    if s is None or share is None:
        return _verdict(None, None, _why_missing(res, "retrieval"))
    detail = f"{s.metrics.get('n_heads_above_threshold')} of {s.metrics.get('n_heads')} heads > " \
             f"{s.metrics.get('threshold')}"
    if s.metrics.get("too_few_counted"):
        detail += f" (noisy: only {s.metrics.get('n_counted')} samples counted)"
    return _verdict(share < SPARSE_SHARE, share, detail)


def claim_memory_context_late(res: ModelResults, top: int) -> dict[str, Any]:
    sets = top_sets(res, top)
    heads = [*sets.get("memory", []), *sets.get("context", [])]
    depth = _mean_depth(heads, res.n_layers)
    if depth is None:
        return _verdict(None, None, _why_missing(res, "conflict-heads"))
    n_mem, n_ctx = len(sets.get("memory", [])), len(sets.get("context", []))
    return _verdict(depth > LATE_DEPTH, depth, f"mean relative depth of {n_mem} memory + {n_ctx} context heads")


def claim_cmr_mid_late(res: ModelResults, top: int) -> dict[str, Any]:
    s = res.summaries.get("cmr")
    if s is None or not s.heads:
        return _verdict(None, None, _why_missing(res, "cmr"))
    like = [h for h in s.heads if h.get("cmr_like")]
    share = len(like) / len(s.heads)
    depth = _mean_depth(like, res.n_layers)
    if depth is None:
        # The claim places CMR-like heads; a model without any does not show it.
        return _verdict(False, None, f"no CMR-like heads (share {share:.3f})", share=share)
    return _verdict(depth > LATE_DEPTH, depth,
                    f"mean relative depth of {len(like)} CMR-like heads, share {share:.3f}", share=share)


def claim_induction_exists(res: ModelResults, top: int) -> dict[str, Any]:
    s = res.summaries.get("induction")
    heads = _scored(s.heads if s is not None else None)
    if s is None or not heads or "threshold" not in s.metrics:
        return _verdict(None, None, _why_missing(res, "induction"))
    best = max(float(h["score"]) for h in heads)
    threshold = float(s.metrics["threshold"])
    n_above = sum(float(h["score"]) > threshold for h in heads)
    return _verdict(best > threshold, best, f"max induction score; {n_above} heads > {threshold}")


def claim_induction_retrieval_overlap(res: ModelResults, top: int) -> dict[str, Any]:
    sets = top_sets(res, top)
    missing = [d for d in ("induction", "retrieval") if d not in sets]
    if missing:
        return _verdict(None, None, "; ".join(_why_missing(res, d) for d in missing))
    j = jaccard(sets["induction"], sets["retrieval"])
    return _verdict(j is not None and j > 0, j, f"Jaccard of the top-{top} sets")


def claim_retrieval_masking(res: ModelResults, top: int) -> dict[str, Any]:
    s = res.summaries.get("retrieval-masking")
    if s is None:
        return _verdict(None, None, _why_missing(res, "retrieval-masking"))
    m = s.metrics
    k = m.get("top_k")
    none, masked, rand = m.get("accuracy:none"), m.get(f"accuracy:top{k}"), m.get("accuracy:random-mean")
    if none is None or masked is None or rand is None:
        return _verdict(None, None, "retrieval-masking has no accuracies")
    detail = (f"needle accuracy {none:.2f} unmasked, {masked:.2f} top-{k} masked, {rand:.2f} {k} random "
              f"(mean of {m.get('n_random')} draws), {m.get('n_samples')} samples")
    if none == 0:
        return _verdict(None, None, detail + ": nothing to drop")
    # The value is how much more the top heads cost than random ones.
    # Rounded: rates are fractions of few items, and 0.45 - 0.45 must read 0, not -6.9e-18.
    return _verdict(masked < rand, round(rand - masked, 9), detail)


def claim_ph3_beats_random(res: ModelResults, top: int) -> dict[str, Any]:
    s = res.summaries.get("ph3")
    if s is None:
        return _verdict(None, None, _why_missing(res, "ph3"))
    m = s.metrics
    formats = sorted({k.split(".")[3] for k in m if k.startswith("test.unpruned.conflict.")})
    gains = []
    for f in formats:
        after = m.get(f"test.prune-memory.conflict.{f}.context_rate")
        rand = m.get(f"test.prune-memory.random-control.conflict.{f}.context_rate")
        if after is not None and rand is not None:
            gains.append(after - rand)
    if not gains:
        return _verdict(None, None, "ph3 has no test rates")
    gain = round(sum(gains) / len(gains), 9)
    detail = (f"context rate after pruning the top {m.get('prune-memory.k')} memory heads minus after as "
              f"many random heads, mean over {len(gains)} formats")
    return _verdict(gain > 0, gain, detail)


def claim_decore_beats_greedy(res: ModelResults, top: int) -> dict[str, Any]:
    s = res.summaries.get("decore-eval")
    if s is None:
        return _verdict(None, None, _why_missing(res, "decore-eval"))
    m = s.metrics
    greedy, decore = m.get("nqswap:greedy:test_accuracy"), m.get("nqswap:decore-entropy:test_accuracy")
    if greedy is None or decore is None:
        return _verdict(None, None, "decore-eval did not run the nqswap task")
    detail = (f"NQ-Swap-style test accuracy {decore:.2f} DeCoRe-entropy (k={m.get('nqswap:decore-entropy:k')}) "
              f"vs {greedy:.2f} greedy, {m.get('nqswap:n_test')} items")
    return _verdict(decore > greedy, round(decore - greedy, 9), detail)


def claim_mlp_peak_early(res: ModelResults, top: int) -> dict[str, Any]:
    s = res.summaries.get("causal-trace")
    layer = s.metrics.get("peak_layer_mlp_last_subject") if s is not None else None
    if s is None or layer is None:
        return _verdict(None, None, _why_missing(res, "causal-trace"))
    depth = int(layer) / res.n_layers
    detail = (f"MLP restoration at the last subject token peaks at layer {int(layer)} of {res.n_layers} "
              f"(effect {float(s.metrics.get('peak_value_mlp_last_subject', float('nan'))):.3f}, "
              f"{s.metrics.get('n_facts_traced')} facts)")
    return _verdict(depth <= LATE_DEPTH, depth, detail)


@dataclass(frozen=True)
class Claim:
    """A paper's qualitative claim: its id, its row title in the 80-column table, its text with
    the paper, how it is checked, and the detectors whose runs hold the numbers behind it."""

    id: str
    short: str
    text: str
    check: Callable[[ModelResults, int], dict[str, Any]]
    detectors: tuple[str, ...]


CLAIMS = (
    Claim("retrieval-sparse", "retrieval sparse",
          f"retrieval heads are sparse: share of heads with retrieval score > 0.1 below "
          f"{SPARSE_SHARE:.0%} (Wu et al. 2024)", claim_retrieval_sparse, ("retrieval",)),
    Claim("retrieval-masking", "retr. masking",
          "masking the top-K retrieval heads lowers needle accuracy more than masking K random heads "
          "(Wu et al. 2024, Sec. 4); value: random-masked minus top-masked accuracy", claim_retrieval_masking, ("retrieval-masking",)),
    Claim("memory-context-late", "mem/ctx late",
          f"memory/context heads sit in later layers: mean relative depth of the top memory and "
          f"context heads > {LATE_DEPTH} (Jin et al. 2024)", claim_memory_context_late, ("conflict-heads",)),
    Claim("ph3-beats-random", "PH3 vs random",
          "pruning the top memory heads raises the context rate more than pruning as many random heads "
          "(PH3, Jin et al. 2024); value: the difference in test context rate", claim_ph3_beats_random, ("ph3",)),
    Claim("decore-beats-greedy", "DeCoRe vs greedy",
          "DeCoRe-entropy answers NQ-Swap-style conflicts from the context more often than greedy decoding "
          "(Gema et al. 2024); value: accuracy difference on the test split", claim_decore_beats_greedy, ("decore-eval",)),
    Claim("mlp-peak-early", "MLP peak early",
          f"the MLP effect at the last subject token peaks in early-to-middle layers: relative depth of "
          f"the peak <= {LATE_DEPTH} (Meng et al. 2022, Sec. 2)", claim_mlp_peak_early, ("causal-trace",)),
    Claim("cmr-mid-late", "CMR-like mid-late",
          f"CMR-like heads in middle-to-late layers: mean relative depth of the CMR-like heads "
          f"(distance < 0.5) > {LATE_DEPTH}, with their share (Ji-An et al. 2024)", claim_cmr_mid_late, ("cmr",)),
    Claim("induction-exists", "induction exists",
          "induction heads exist: some head above the induction threshold (Olsson et al. 2022)",
          claim_induction_exists, ("induction",)),
    Claim("induction-retrieval-overlap", "ind/retr overlap",
          "induction top set overlaps retrieval top set: Jaccard > 0 (Wu et al. 2024 report "
          "retrieval heads distinct from induction heads)", claim_induction_retrieval_overlap, ("induction", "retrieval")),
)


def _overlaps(res: ModelResults, top: int) -> list[dict[str, Any]]:
    sets = top_sets(res, top)
    names = [n for n, _ in SETS if n in sets and n != "context"] + (["context"] if "context" in sets else [])
    return [{"a": a, "b": b, "jaccard": jaccard(sets[a], sets[b])}
            for i, a in enumerate(names) for b in names[i + 1:]]


def summarize(models: Mapping[str, ModelResults], detectors: Sequence[str], top: int) -> dict[str, Any]:
    """The atlas as one JSON-able dict: per detector and model the top-k heads (label, relative
    depth, score) or why it is not measurable; per model the Jaccard overlaps of the top-k head
    sets; per claim and model a verdict with the number behind it."""
    by_detector: dict[str, dict[str, Any]] = {}
    for det in detectors:
        by_detector[det] = {}
        for name, res in models.items():
            s = res.summaries.get(det)
            if s is None:
                by_detector[det][name] = {"not_measurable": res.not_measurable.get(det, "not run")}
                continue
            heads = _head_rows(_scored(s.heads)[:top], res.n_layers) if s.heads else []
            scalars = {k: v for k, v in s.metrics.items() if isinstance(v, int | float | str | bool)}
            by_detector[det][name] = {"heads": heads, "metrics": scalars, "warnings": list(s.warnings)}
    return {
        "top": top,
        "models": {name: {"n_layers": r.n_layers, "n_heads": r.n_heads} for name, r in models.items()},
        "detectors": by_detector,
        "overlap": {name: _overlaps(res, top) for name, res in models.items()},
        "claims": [{"id": c.id, "short": c.short, "claim": c.text, "detectors": list(c.detectors),
                    "models": {name: c.check(res, top) for name, res in models.items()}} for c in CLAIMS],
    }


# ------------------------------------------------------------------------------ validation


def _split(raw: str) -> list[str]:
    return list(dict.fromkeys(x.strip() for x in raw.split(",") if x.strip()))


def resolve_detectors(raw: str | None) -> list[str]:
    """The detectors to run, their scan parameters checked, before any model is loaded."""
    registry = all_detectors()
    names = _split(raw) if raw is not None else [d for d in DEFAULT_DETECTORS if d in registry]
    if not names:
        raise UserError("--detectors names no detector")
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise UserError(f"unknown detector {', '.join(map(repr, unknown))} (available: {', '.join(registry)})")
    for n in names:
        registry[n].parse_params(atlas_params(n))
    return names


def atlas_params(name: str, summaries: Mapping[str, Summary] | None = None) -> dict[str, Any]:
    """The parameters the atlas runs a detector with: its scan parameters, the atlas's overrides
    and, for a detector ranked by retrieval score, the ranking of the retrieval run in
    ``summaries`` when there is one."""
    from interp.registry import get_detector

    params = {**type(get_detector(name)).scan_params, **ATLAS_PARAMS.get(name, {})}
    retrieval = (summaries or {}).get("retrieval")
    if name in RANKED_BY_RETRIEVAL and retrieval is not None and retrieval.heads:
        ranked = sorted(_scored(retrieval.heads), key=lambda h: -float(h["score"]))
        params["heads"] = ",".join(f"{int(h['layer'])}.{int(h['head'])}" for h in ranked)
    return params


def resolve_models(raw: str | None) -> list[str]:
    """Zoo names and local folders of a supported architecture; anything else is a one-line error."""
    from interp.loading import check_architecture
    from interp.zoo import ZOO

    names = _split(raw) if raw is not None else list(ZOO)
    if not names:
        raise UserError("--models names no model")
    for n in names:
        if n in ZOO:
            continue
        path = Path(n).expanduser()
        if not path.is_dir():
            what = "no such folder" if path.exists() or "/" in n or n.startswith(".") else "unknown model"
            raise UserError(f"{what} {n!r} (zoo: {', '.join(ZOO)}; or an existing local model folder)")
    # A folder the workbench cannot hook is refused now, not after the models before it ran.
    for n in names:
        if n not in ZOO:
            check_architecture(Path(n).expanduser())
    return names


def _labels(models: Sequence[str]) -> dict[str, str]:
    """Short, distinct column titles: zoo names, folder names (numbered when two clash)."""
    base = {m: Path(m).name or m for m in models}
    counts = Counter(base.values())
    return {m: (f"{b}#{i + 1}" if counts[b] > 1 else b) for i, (m, b) in enumerate(base.items())}


# ------------------------------------------------------------------------------ running


def reuse_finished(model: Any, name: str, params: Mapping[str, Any], store: Any) -> Any:
    """The RunResult of a finished run of this detector with its scan parameters on this model,
    re-finalized from the stored units (no unit recomputed), or None. The runner never resumes a
    finished run (asking again means a rerun), so the atlas looks it up by its key first."""
    from interp.registry import get_detector
    from interp.runner import RunResult, unit_rows
    from interp.store import TABLES, key_context, run_key

    det = get_detector(name)
    cfg = det.parse_params(params)
    key = run_key(model=model.name, model_hash=model.provenance.file_sha256 or "", detector=det.name,
                  variant=det.variant(cfg), params=cfg.to_dict(), dataset_hash=det.dataset_hash(model, cfg),
                  seed=cfg.get("seed"), **key_context(model.provenance.to_dict()))
    run = store.find_run(key, "done")
    if run is None:
        return None
    t0 = time.perf_counter()
    units = det.units(model, cfg)
    summary = det.finalize(model, cfg, {t: unit_rows(run.results(t), units) for t in TABLES})
    return RunResult(run_id=run.id, summary=summary, resumed_units=len(units), computed_units=0,
                     seconds=time.perf_counter() - t0)


def _run_model(model: Any, detectors: Sequence[str], store: Any, fresh: bool, bar: Any, executor: Any = None
               ) -> tuple[ModelResults, dict[str, dict[str, Any]]]:
    """Every detector on one loaded model; a detector the model cannot feed (UserError) is
    recorded as not measurable and the atlas goes on."""
    from interp.runner import run_detector

    summaries: dict[str, Summary] = {}
    missing: dict[str, str] = {}
    runs: dict[str, dict[str, Any]] = {}
    for name in detectors:
        bar.set_description(f"{name} on {model.name}")
        try:
            params = atlas_params(name, summaries)
            result = None if fresh else reuse_finished(model, name, params, store)
            if result is None:
                result = run_detector(model, name, params, store, resume=not fresh, progress=False,
                                      executor=executor)
        except UserError as exc:
            missing[name] = " ".join(str(exc).split())
            runs[name] = {"not_measurable": missing[name]}
        except Exception as exc:  # one detector's bug must not lose the other runs
            # The run is stored as failed (rerunning resumes it); the atlas goes on and exits non-zero.
            missing[name] = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())}"
            runs[name] = {"failed": missing[name]}
        else:
            summaries[name] = result.summary
            compute = store.run(result.run_id).info().get("duration_s")
            runs[name] = {"run_id": result.run_id, "units_computed": result.computed_units,
                          "units_resumed": result.resumed_units, "seconds": round(result.seconds, 3),
                          "compute_s": None if compute is None else round(float(compute), 3),
                          "ranked_by_retrieval": "heads" in params}
        bar.update(1)
    res = ModelResults(n_layers=model.info.n_layers, n_heads=model.info.n_total_heads,
                       summaries=summaries, not_measurable=missing)
    return res, runs


class PeakRSS:
    """The largest resident set size of this process while the block runs, sampled every
    ``interval`` seconds from /proc (Linux); elsewhere the process's lifetime peak (getrusage)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current_mb() -> float:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            import resource

            # ru_maxrss is in KiB on Linux, bytes on macOS.
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024
        return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self.current_mb())

    def __enter__(self) -> PeakRSS:
        self.peak_mb = self.current_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.current_mb())


def model_cost(runs: Mapping[str, Mapping[str, Any]], load_s: float, wall_s: float, peak_mb: float) -> dict[str, Any]:
    """What one model cost: this invocation's wall time and peak memory, and the compute time of
    its runs as stored (summed over every session that worked on them, so a resumed or reused
    run still counts what it took)."""
    compute = [r["compute_s"] for r in runs.values() if r.get("compute_s") is not None]
    return {"load_s": round(load_s, 1), "wall_s": round(wall_s, 1), "compute_s": round(sum(compute), 1),
            "peak_rss_mb": round(peak_mb), "runs_computed": sum(bool(r.get("units_computed")) for r in runs.values())}


def write_atlas(ws: Path, doc: Mapping[str, Any]) -> Path:
    """The atlas as ``atlas.json`` in the workspace, for the dashboard; written whole or not at all."""
    path = ws / "atlas.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, default=_plain, indent=1))
    tmp.replace(path)
    return path


def _plain(o: Any) -> Any:
    # numpy scalars (metrics) as plain numbers, as the other commands' --json writes them.
    return o.item() if hasattr(o, "item") else str(o)


# ------------------------------------------------------------------------------ printing


def _cell(result: Mapping[str, Any]) -> str:
    word = {HOLDS: "yes", FAILS: "no", NM: "n.m."}[result["verdict"]]
    value = result["value"]
    return f"{word} {value:.3g}" if isinstance(value, int | float) else word


def _chunks(widths: Sequence[int], first: int) -> list[list[int]]:
    """Column indices split so that each table (first column + its chunk) fits 80 columns."""
    chunks: list[list[int]] = [[]]
    used = 1 + first + 3
    for i, w in enumerate(widths):
        if chunks[-1] and used + w + 3 > COLUMNS:
            chunks.append([])
            used = 1 + first + 3
        chunks[-1].append(i)
        used += w + 3
    return chunks


def _table(title: str, first: str, rows: Sequence[tuple[str, Sequence[str]]], titles: Sequence[str]) -> list[Table]:
    """Tables of rows x titled columns, the columns split over as many tables as 80 columns need."""
    first_w = max(len(first), *(len(r[0]) for r in rows)) if rows else len(first)
    widths = [max(len(t), *(len(r[1][i]) for r in rows)) for i, t in enumerate(titles)]
    out_tables = []
    for chunk in _chunks(widths, first_w):
        table = Table(title=title)
        table.add_column(first, no_wrap=True)
        for i in chunk:
            table.add_column(titles[i], no_wrap=True, overflow="ellipsis", max_width=COLUMNS - first_w - 7)
        for name, cells in rows:
            table.add_row(name, *(cells[i] for i in chunk))
        out_tables.append(table)
    return out_tables


def print_atlas(atlas: Mapping[str, Any], labels: Mapping[str, str]) -> None:
    models = list(atlas["models"])
    titles = [labels[m] for m in models]
    rows = [(c["short"], [_cell(c["models"][m]) for m in models]) for c in atlas["claims"]]
    for t in _table("claims (n.m. = not measurable)", "claim", rows, titles):
        out.print(t)
    for c in atlas["claims"]:
        # Wrapped here, indented, so that every line stays under 80 columns on any console.
        for line in textwrap.wrap(f"{c['short']}: {c['claim']}", width=COLUMNS - 2,
                                  initial_indent="  ", subsequent_indent="    "):
            out.print(line, markup=False, highlight=False)
    for det, per_model in atlas["detectors"].items():
        if not any(entry.get("heads") or "not_measurable" in entry for entry in per_model.values()):
            continue  # an intervention or curve detector: its numbers are in the claims
        rows = []
        for m in models:
            entry = per_model[m]
            if "not_measurable" in entry:
                rows.append((labels[m], [f"n.m.: {entry['not_measurable']}"]))
                continue
            heads = [f"{h['label']} @{h['relative_depth']:.2f}" for h in entry["heads"][:3]]
            rows.append((labels[m], ["  ".join(heads) or "no head scores"]))
        for t in _table(f"{det}: top 3 heads @ relative depth", "model", rows, ["heads"]):
            out.print(t)


def _print_costs(atlas: Mapping[str, Any], labels: Mapping[str, str]) -> None:
    rows = []
    for m, info in atlas["models"].items():
        c = info.get("cost")
        if c is not None:
            rows.append((labels[m], [f"{c['compute_s'] / 60:.1f}", f"{c['wall_s'] / 60:.1f}", f"{c['peak_rss_mb'] / 1024:.1f}"]))
    for t in _table("cost per model (compute: the runs' stored time)", "model", rows,
                    ["compute min", "this call min", "peak RSS GiB"]):
        out.print(t)


def _print_overlaps(atlas: Mapping[str, Any], labels: Mapping[str, str]) -> None:
    models = list(atlas["models"])
    per_model = {m: {(p["a"], p["b"]): p["jaccard"] for p in atlas["overlap"][m]} for m in models}
    pairs = list(dict.fromkeys(pair for m in models for pair in per_model[m]))
    if not pairs:
        return
    rows = [(f"{a}/{b}", ["-" if (j := per_model[m].get((a, b))) is None else f"{j:.2f}" for m in models])
            for a, b in pairs]
    for t in _table(f"Jaccard overlap of the top-{atlas['top']} head sets", "sets", rows,
                    [labels[m] for m in models]):
        out.print(t)


# ------------------------------------------------------------------------------ the command


@command("atlas")
def atlas(
    models: Annotated[str | None, typer.Option(
        "--models", help="comma-separated zoo names or local model folders (default: every zoo model)")] = None,
    detectors: Annotated[str | None, typer.Option(
        "--detectors", "-d", help=f"comma-separated detectors (default: {', '.join(DEFAULT_DETECTORS)})")] = None,
    workspace: WorkspaceOpt = None,
    prefix: PrefixOpt = "auto",
    top: Annotated[int, typer.Option("--top", help="k of the top-k head sets")] = 10,
    fresh: Annotated[bool, typer.Option("--fresh", help="start new runs instead of reusing finished ones")] = False,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Run detectors on several models (scan parameters) and compare their memory heads and the
    papers' claims: relative depth, top-k overlap, verdicts per model."""
    from tqdm.auto import tqdm

    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    check_cluster_options(workers, scheduler)
    # Everything is checked before the store is created or a model loaded.
    dets = resolve_detectors(detectors)
    names = resolve_models(models)
    specs = {n: model_spec(n, "bridge", prefix, device, dtype, device_map, max_memory) for n in names}
    store = open_store(workspace)
    results: dict[str, ModelResults] = {}
    runs: dict[str, dict[str, Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(names) * len(dets), unit="run", file=sys.stderr) as bar:
        for name in names:
            bar.set_description(f"loading {name}")
            t0 = time.perf_counter()
            # The workers (--workers, --scheduler) load this model; one model at a time.
            with PeakRSS() as peak, executor_for(specs[name], workers, scheduler) as executor:
                loaded = specs[name].load()
                load_s = time.perf_counter() - t0
                results[name], runs[name] = _run_model(loaded, dets, store, fresh, bar, executor)
                info[name] = {"name": loaded.name, "provenance": loaded.provenance.to_dict(),
                              "n_params": sum(p.numel() for p in loaded.hf.parameters())}
                del loaded  # one model in memory at a time
                gc.collect()
            info[name]["cost"] = model_cost(runs[name], load_s, time.perf_counter() - t0, peak.peak_mb)
    summary = summarize(results, dets, top)
    labels = _labels(names)
    for name in names:
        summary["models"][name].update(label=labels[name], **info[name])
    ws = store.workspace.resolve()
    doc = {"workspace": str(ws), **summary, "runs": runs,
           "params": {d: atlas_params(d) for d in dets}}
    path = write_atlas(ws, doc)
    if as_json:
        sys.stdout.write(json.dumps(doc, default=_plain) + "\n")
        sys.stdout.flush()
    if not as_json:
        print_atlas(summary, labels)
        _print_overlaps(summary, labels)
        _print_costs(summary, labels)
        err.print(f"[dim]results: {ws}; atlas: {path} (dashboard: interp app -w {ws})[/dim]", highlight=False)
    failed = [f"{det} on {labels[m]}" for m, per in runs.items() for det, r in per.items() if "failed" in r]
    if failed:
        raise UserError(f"{len(failed)} run(s) failed ({', '.join(failed)}); rerun the same command to resume them")
