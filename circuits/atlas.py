"""``interp atlas``: the memory heads of several models side by side, and the papers' claims.

Every (model, detector) pair is run with the detector's scan parameters through one results
store, so a rerun reuses finished runs and resumes unfinished ones. The summary (a pure function
of the runs' :class:`~interp.registry.Summary` objects, :func:`summarize`) places each top head
at its relative depth (layer / n_layers), measures how far the top-k head sets of different
detectors overlap (Jaccard), and checks five published claims per model:

- retrieval heads are sparse (Wu et al. 2024),
- memory and context heads sit in later layers (Jin et al. 2024),
- CMR-like heads sit in middle-to-late layers (Ji-An et al. 2024),
- induction heads exist (Olsson et al. 2022),
- the induction top set overlaps the retrieval top set (Wu et al. 2024 report them distinct).

The thresholds are the detectors' own (induction 0.4, retrieval 0.1, CMR-like distance 0.5) or
stated with the claim (5 %, relative depth 0.5); none is fitted to the results.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from rich.table import Table

from circuits.heads import head_label
from interp.cli import JsonOpt, PrefixOpt, WorkspaceOpt, err, open_store, out
from interp.errors import UserError
from interp.registry import Summary, all_detectors, command

DEFAULT_DETECTORS = (
    "induction", "copying", "cmr", "retrieval", "conflict-heads", "causal-trace", "attention-knockout",
)
# The head sets whose overlap is measured, in this order: (set name, detector it comes from).
SETS = (("induction", "induction"), ("retrieval", "retrieval"), ("cmr", "cmr"),
        ("memory", "conflict-heads"), ("context", "conflict-heads"))
# Stated with the claims, never fitted: "sparse" as Wu et al. 2024 put it (under 5 % of heads),
# "later" / "middle-to-late" as a mean relative depth past the middle of the stack.
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


@dataclass(frozen=True)
class Claim:
    id: str
    short: str  # the row title of the 80-column table
    text: str
    check: Callable[[ModelResults, int], dict[str, Any]]


CLAIMS = (
    Claim("retrieval-sparse", "retrieval sparse",
          f"retrieval heads are sparse: share of heads with retrieval score > 0.1 below "
          f"{SPARSE_SHARE:.0%} (Wu et al. 2024)", claim_retrieval_sparse),
    Claim("memory-context-late", "mem/ctx late",
          f"memory/context heads sit in later layers: mean relative depth of the top memory and "
          f"context heads > {LATE_DEPTH} (Jin et al. 2024)", claim_memory_context_late),
    Claim("cmr-mid-late", "CMR-like mid-late",
          f"CMR-like heads in middle-to-late layers: mean relative depth of the CMR-like heads "
          f"(distance < 0.5) > {LATE_DEPTH}, with their share (Ji-An et al. 2024)", claim_cmr_mid_late),
    Claim("induction-exists", "induction exists",
          "induction heads exist: some head above the induction threshold (Olsson et al. 2022)",
          claim_induction_exists),
    Claim("induction-retrieval-overlap", "ind/retr overlap",
          "induction top set overlaps retrieval top set: Jaccard > 0 (Wu et al. 2024 report "
          "retrieval heads distinct from induction heads)", claim_induction_retrieval_overlap),
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
        "claims": [{"id": c.id, "short": c.short, "claim": c.text,
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
        registry[n].parse_params(registry[n].scan_params)
    return names


def resolve_models(raw: str | None) -> list[str]:
    """Zoo names and existing local folders; anything else is a one-line error."""
    from interp.zoo import ZOO

    names = _split(raw) if raw is not None else list(ZOO)
    if not names:
        raise UserError("--models names no model")
    for n in names:
        if n in ZOO:
            continue
        path = Path(n).expanduser()
        if path.is_dir():
            continue
        what = "no such folder" if path.exists() or "/" in n or n.startswith(".") else "unknown model"
        raise UserError(f"{what} {n!r} (zoo: {', '.join(ZOO)}; or an existing local model folder)")
    return names


def _labels(models: Sequence[str]) -> dict[str, str]:
    """Short, distinct column titles: zoo names, folder names (numbered when two clash)."""
    base = {m: Path(m).name or m for m in models}
    counts = Counter(base.values())
    return {m: (f"{b}#{i + 1}" if counts[b] > 1 else b) for i, (m, b) in enumerate(base.items())}


# ------------------------------------------------------------------------------ running


def _unit_rows(df: pd.DataFrame) -> pd.DataFrame:
    """A stored table's rows written by the detector's units (as the runner finalizes them)."""
    from interp.store import FINAL_UNIT, SETTINGS_UNIT, WARNINGS_UNIT

    if "unit" not in df.columns:
        return df
    keep = ~df["unit"].isin([FINAL_UNIT, WARNINGS_UNIT, SETTINGS_UNIT])
    return pd.DataFrame(df.loc[keep]).reset_index(drop=True)


def reuse_finished(model: Any, name: str, store: Any) -> Any:
    """The RunResult of a finished run of this detector with its scan parameters on this model,
    re-finalized from the stored units (no unit recomputed), or None. The runner never resumes a
    finished run (asking again means a rerun), so the atlas looks it up by its key first."""
    from interp.registry import get_detector
    from interp.runner import RunResult
    from interp.store import TABLES, run_key

    det = get_detector(name)
    cfg = det.parse_params(type(det).scan_params)
    key = run_key(model=model.name, model_hash=model.provenance.file_sha256 or "", detector=det.name,
                  variant=det.variant(cfg), params=cfg.to_dict(), dataset_hash=det.dataset_hash(model, cfg),
                  seed=cfg.get("seed"), prefix=model.provenance.to_dict().get("prefix"))
    run = store.find_run(key, "done")
    if run is None:
        return None
    t0 = time.perf_counter()
    n_units = len(det.units(model, cfg))
    summary = det.finalize(model, cfg, {t: _unit_rows(run.results(t)) for t in TABLES})
    return RunResult(run_id=run.id, summary=summary, resumed_units=n_units, computed_units=0,
                     seconds=time.perf_counter() - t0)


def _run_model(model: Any, detectors: Sequence[str], store: Any, fresh: bool, bar: Any
               ) -> tuple[ModelResults, dict[str, dict[str, Any]]]:
    """Every detector on one loaded model; a detector the model cannot feed (UserError) is
    recorded as not measurable and the atlas goes on."""
    from interp.registry import all_detectors
    from interp.runner import run_detector

    registry = all_detectors()
    summaries: dict[str, Summary] = {}
    missing: dict[str, str] = {}
    runs: dict[str, dict[str, Any]] = {}
    for name in detectors:
        bar.set_description(f"{name} on {model.name}")
        try:
            result = None if fresh else reuse_finished(model, name, store)
            if result is None:
                result = run_detector(model, name, registry[name].scan_params, store,
                                      resume=not fresh, progress=False)
        except UserError as exc:
            missing[name] = " ".join(str(exc).split())
            runs[name] = {"not_measurable": missing[name]}
        else:
            summaries[name] = result.summary
            runs[name] = {"run_id": result.run_id, "units_computed": result.computed_units,
                          "units_resumed": result.resumed_units, "seconds": round(result.seconds, 3)}
        bar.update(1)
    res = ModelResults(n_layers=model.info.n_layers, n_heads=model.info.n_total_heads,
                       summaries=summaries, not_measurable=missing)
    return res, runs


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
) -> None:
    """Run detectors on several models (scan parameters) and compare their memory heads and the
    papers' claims: relative depth, top-k overlap, verdicts per model."""
    from tqdm.auto import tqdm

    import interp

    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    # Everything is checked before the store is created or a model loaded.
    dets = resolve_detectors(detectors)
    names = resolve_models(models)
    store = open_store(workspace)
    results: dict[str, ModelResults] = {}
    runs: dict[str, dict[str, Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(names) * len(dets), unit="run", file=sys.stderr) as bar:
        for name in names:
            bar.set_description(f"loading {name}")
            loaded = interp.load_model(name, backend="bridge", prefix=prefix)
            results[name], runs[name] = _run_model(loaded, dets, store, fresh, bar)
            info[name] = {"name": loaded.name, "provenance": loaded.provenance.to_dict()}
            del loaded  # one model in memory at a time
    summary = summarize(results, dets, top)
    labels = _labels(names)
    for name in names:
        summary["models"][name].update(label=labels[name], **info[name])
    ws = store.workspace.resolve()
    if as_json:
        doc = {"workspace": str(ws), **summary, "runs": runs}
        # numpy scalars (metrics) as plain numbers, as the other commands' --json writes them.
        sys.stdout.write(json.dumps(doc, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")
        sys.stdout.flush()
        return
    print_atlas(summary, labels)
    _print_overlaps(summary, labels)
    err.print(f"[dim]results: {ws}[/dim]", highlight=False)
