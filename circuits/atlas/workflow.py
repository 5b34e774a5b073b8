"""``interp atlas``: the memory heads of several models side by side, and the papers' claims.

Every (model, detector) pair is run with the detector's scan parameters through one results
store, so a rerun reuses finished runs and resumes unfinished ones. The atlas itself is a run
of that store too (:mod:`circuits.atlas.stored`: its claims and document, which the dashboard's
Atlas page reads), a new one per call. The summary (a pure function
of the runs' :class:`~interp.runs.registry.Summary` objects, :func:`summarize`) places each top head
at its relative depth (layer / n_layers), measures how far the top-k head sets of different
detectors overlap (Jaccard), and checks ten published claims per model (:data:`CLAIMS`):
retrieval heads are sparse and masking them hurts more than masking random heads (Wu et al.
2024), memory and context heads sit in later layers and pruning them moves the rates more than
random pruning (Jin et al. 2024), DeCoRe beats greedy decoding on NQ-Swap-style conflicts
(Gema et al. 2024), the MLP effect at the last subject token peaks in early-to-middle layers
(Meng et al. 2022), CMR-like heads sit in middle-to-late layers (Ji-An et al. 2024), induction
heads exist and their keys are written by previous-token heads (Olsson et al. 2022), and the induction top set overlaps the retrieval top set (Wu
et al. 2024 report them distinct).

The thresholds are the detectors' own (induction 0.4, retrieval 0.1, CMR-like distance 0.5) or
stated with the claim (5 %, relative depth 0.5, "more than random"); none is fitted to the results.
"""

from __future__ import annotations

import gc
import os
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from circuits.atlas import stored
from circuits.atlas.claims import FAILS, HOLDS, INCONCLUSIVE, NM, ModelResults, _scored, summarize
from interp.console import err, out
from interp.errors import UserError
from interp.model.load import load_spec
from interp.model.spec import ModelSpec
from interp.options import (
    ClusterOptions,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxMemoryOpt,
    ModelOptions,
    PrefixOpt,
    SchedulerOpt,
    WorkersOpt,
    WorkspaceOpt,
)
from interp.runs.registry import Summary, all_detectors, command
from interp.runs.store import Store

DEFAULT_DETECTORS = (
    "induction", "path-patching", "copying", "cmr", "retrieval", "retrieval-masking", "conflict-heads", "ph3", "decore-eval",
    "causal-trace", "attention-knockout",
)
# The atlas runs each detector with its scan parameters, overridden here where those take too
# long for four models on a 2-core CPU. Each override is a documented variant or a smaller
# sample, never a changed method, and is stored with the run like any parameter:
# - retrieval ranks by the teacher-forced answer ("fast": one forward pass per sample instead of
#   greedy decoding with attention read at every step) on 12 haystacks instead of 27;
# - retrieval-masking decodes 8 haystacks of up to 600 tokens against 2 random draws;
# - ph3 and decore-eval evaluate fewer items and fewer k (decore-eval: NQ-Swap only); decore-eval
#   draws its random-head control once (no claim reads the control; 20 draws would add about
#   19 x the control's decoding to the largest part of the budget);
# - attention-knockout traces 5 facts.
ATLAS_PARAMS: dict[str, dict[str, Any]] = {
    "retrieval": {"mode": "fast", "n_lengths": 2, "n_depths": 2, "n_needles": 3},
    "retrieval-masking": {"n_lengths": 2, "n_depths": 2, "n_needles": 2, "max_length": 600, "n_random": 2,
                          "seed": 1},
    "ph3": {"max_items": 40, "ks": "1,3,5", "scale_heads": 0},
    "decore-eval": {"max_items": 20, "ks": "1,3,10", "tasks": "nqswap", "n_random": 1},
    "attention-knockout": {"limit": 5},
    "path-patching": {"task": "induction", "metric": "logit-diff", "n_prompts": 4, "seq_len": 10},
}
# path-patching patches every head below them into the keys of the top induction heads of the
# model's induction run (its "receivers" parameter): the K-composition claim (Olsson et al. 2022).
KEYS_OF_TOP_INDUCTION = 3
# Detectors that rank heads by retrieval score get the atlas's retrieval ranking of the same
# model (its "heads" parameter) instead of computing the same scan again. retrieval-masking then
# tests on other haystack windows (seed 1) than the ranking saw (seed 0), as it does on its own.
RANKED_BY_RETRIEVAL = ("retrieval-masking", "decore-eval")
COLUMNS = 80


# ------------------------------------------------------------------------------ the summary


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


def atlas_params(name: str, summaries: Mapping[str, Summary] | None = None, group_size: int = 1) -> dict[str, Any]:
    """The parameters the atlas runs a detector with: its scan parameters, the atlas's overrides
    and, for a detector ranked by retrieval score, the ranking of the retrieval run in
    ``summaries`` when there is one; for path-patching, the keys of the top induction heads of
    the induction run in ``summaries`` (query heads per kv head: ``group_size``)."""
    from interp.runs.registry import get_detector

    params = {**type(get_detector(name)).scan_params, **ATLAS_PARAMS.get(name, {})}
    retrieval = (summaries or {}).get("retrieval")
    if name in RANKED_BY_RETRIEVAL and retrieval is not None and retrieval.heads:
        ranked = sorted(_scored(retrieval.heads), key=lambda h: -float(h["score"]))
        params["heads"] = ",".join(f"{int(h['layer'])}.{int(h['head'])}" for h in ranked)
    if name == "path-patching" and summaries is not None:
        params["receivers"] = _induction_keys(summaries.get("induction"), group_size)
    return params


def _induction_keys(induction: Summary | None, group_size: int) -> str:
    """The k receivers (kv heads) of the top induction heads, best first, without repeats."""
    if induction is None or not induction.heads:
        raise UserError("path-patching patches into the top induction heads' keys: it needs the induction run")
    # A head of layer 0 reads keys no head writes: it cannot show K-composition.
    above = [h for h in _scored(induction.heads) if int(h["layer"]) > 0]
    ranked = sorted(above, key=lambda h: -float(h["score"]))[:KEYS_OF_TOP_INDUCTION]
    keys = [f"k:{int(h['layer'])}.{int(h['head']) // group_size}" for h in ranked]
    return ",".join(dict.fromkeys(keys))


def resolve_models(raw: str | None) -> list[str]:
    """Each model once, by its one name (:func:`~interp.model.loading.resolve_model_name`: a
    folder spelled two ways, relative or absolute, or the zoo's cached folder of a zoo model, is
    one model), zoo names and local folders of a supported architecture only; anything else is a
    one-line error. A name given twice is said once on stderr and run once."""
    from interp.model.loading import check_architecture, resolve_model_name
    from interp.model.zoo import ZOO

    given = _split(raw) if raw is not None else list(ZOO)
    if not given:
        raise UserError("--models names no model")
    names: dict[str, list[str]] = {}
    for n in given:
        one = resolve_model_name(n)
        if one not in ZOO and not Path(one).is_dir():
            raise UserError(f"unknown model {n!r} (zoo: {', '.join(ZOO)}; or an existing local model folder)")
        names.setdefault(one, []).append(n)
    for one, spellings in names.items():
        if len(spellings) > 1:
            err.print(f"[dim]{', '.join(spellings)}: one model ({one}), run once[/dim]", highlight=False)
    # A folder the workbench cannot hook is refused now, not after the models before it ran.
    for n in names:
        if n not in ZOO:
            check_architecture(Path(n))
    return list(names)


def _labels(models: Sequence[str]) -> dict[str, str]:
    """Short, distinct column titles: zoo names, folder names (numbered when two clash)."""
    base = {m: Path(m).name or m for m in models}
    counts = Counter(base.values())
    return {m: (f"{b}#{i + 1}" if counts[b] > 1 else b) for i, (m, b) in enumerate(base.items())}


# ------------------------------------------------------------------------------ running


def _run_model(model: Any, detectors: Sequence[str], store: Any, fresh: bool, bar: Any, executor: Any = None
               ) -> tuple[ModelResults, dict[str, dict[str, Any]]]:
    """Every detector on one loaded model; a detector the model cannot feed (UserError) is
    recorded as not measurable and the atlas goes on."""
    from interp.runs.runner import find_or_run, run_detector

    summaries: dict[str, Summary] = {}
    missing: dict[str, str] = {}
    runs: dict[str, dict[str, Any]] = {}
    for name in detectors:
        bar.set_description(f"{name} on {model.name}")
        try:
            params = atlas_params(name, summaries, model.info.group_size)
            if fresh:
                result = run_detector(model, name, params, store, resume=False, progress=False, executor=executor)
            else:  # a finished run is reused, an interrupted one resumed
                result = find_or_run(model, name, params, store, progress=False, executor=executor)
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


def add_claim_costs(summary: Mapping[str, Any], runs: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
    """Each claim's ``cost_s`` per model: the stored compute time of the runs of the detectors it
    reads (a run read by several claims, induction's for one, counts in each)."""
    for claim in summary["claims"]:
        for model, result in claim["models"].items():
            times = [runs[model].get(d, {}).get("compute_s") for d in claim["detectors"]]
            result["cost_s"] = round(sum(t for t in times if t is not None), 1)


def model_cost(runs: Mapping[str, Mapping[str, Any]], load_s: float, wall_s: float, peak_mb: float) -> dict[str, Any]:
    """What one model cost: this invocation's wall time and peak memory, and the compute time of
    its runs as stored (summed over every session that worked on them, so a resumed or reused
    run still counts what it took)."""
    compute = [r["compute_s"] for r in runs.values() if r.get("compute_s") is not None]
    return {"load_s": round(load_s, 1), "wall_s": round(wall_s, 1), "compute_s": round(sum(compute), 1),
            "peak_rss_mb": round(peak_mb), "runs_computed": sum(bool(r.get("units_computed")) for r in runs.values())}


# ------------------------------------------------------------------------------ printing


def _cell(result: Mapping[str, Any]) -> str:
    word = {HOLDS: "yes", FAILS: "no", INCONCLUSIVE: "inconcl.", NM: "n.m."}[result["verdict"]]
    if "need" in result:
        word += "*"  # inconclusive at this budget: the lines under the table say what it needs
    value, lo, hi = result["value"], result.get("lo"), result.get("hi")
    if not isinstance(value, int | float):
        return word
    if isinstance(lo, int | float) and isinstance(hi, int | float):
        return f"{word} {value:.2g} [{lo:.2g},{hi:.2g}]"
    return f"{word} {value:.3g}"


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
    for t in _table("claims (n.m. = not measurable; * = inconclusive at this budget)", "claim", rows, titles):
        out.print(t)
    for c in atlas["claims"]:
        for m in models:
            if "need" in (r := c["models"][m]):
                for line in textwrap.wrap(f"* {c['short']}, {labels[m]}: {r['need'].split(': ', 1)[1]}",
                                          width=COLUMNS - 2, initial_indent="  ", subsequent_indent="    "):
                    out.print(line, markup=False, highlight=False)
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


def _run_models(
    specs: Mapping[str, ModelSpec], dets: Sequence[str], store: Store, fresh: bool, cluster: ClusterOptions
) -> tuple[dict[str, ModelResults], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every detector on every model, one model loaded at a time: each model's results, runs
    and information (name, provenance, parameters, cost)."""
    from tqdm.auto import tqdm

    results: dict[str, ModelResults] = {}
    runs: dict[str, dict[str, Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(specs) * len(dets), unit="run", file=sys.stderr) as bar:
        for name, spec in specs.items():
            bar.set_description(f"loading {name}")
            t0 = time.perf_counter()
            # The workers (--workers, --scheduler) load this model; one model at a time.
            with PeakRSS() as peak, cluster.executor(spec) as executor:
                loaded = load_spec(spec)
                load_s = time.perf_counter() - t0
                results[name], runs[name] = _run_model(loaded, list(dets), store, fresh, bar, executor)
                info[name] = {"name": loaded.name, "provenance": loaded.provenance.to_dict(),
                              "n_params": sum(p.numel() for p in loaded.hf.parameters())}
                del loaded  # one model in memory at a time
                gc.collect()
            info[name]["cost"] = model_cost(runs[name], load_s, time.perf_counter() - t0, peak.peak_mb)
    return results, runs, info


@command("atlas")
def atlas(
    models: Annotated[str | None, typer.Option(
        "--models", help="comma-separated zoo names or local model folders (default: every zoo model)")] = None,
    detectors: Annotated[str | None, typer.Option(
        "--detectors", "-d", help=f"comma-separated detectors (default: {', '.join(DEFAULT_DETECTORS)})")] = None,
    workspace: WorkspaceOpt = None,
    prefix: PrefixOpt = ModelOptions.prefix,
    top: Annotated[int, typer.Option("--top", help="k of the top-k head sets")] = 10,
    fresh: Annotated[bool, typer.Option("--fresh", help="start new runs instead of reusing finished ones")] = False,
    as_json: JsonOpt = False,
    device: DeviceOpt = ModelOptions.device,
    dtype: DtypeOpt = ModelOptions.dtype,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Run detectors on several models (scan parameters) and compare their memory heads and the
    papers' claims: relative depth, top-k overlap, verdicts per model."""
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    # Everything is checked before the store is created or a model loaded: the detectors, the
    # models, their placement and the cluster (a scheduler must answer now, not after the first model).
    dets, names = resolve_detectors(detectors), resolve_models(models)
    specs = {n: ModelOptions(n, "bridge", prefix, device, dtype, device_map, max_memory).check() for n in names}
    (cluster := ClusterOptions(workers, scheduler)).check(list(specs.values()))
    store = Store(workspace)
    default = [d for d in DEFAULT_DETECTORS if d in all_detectors()]
    # The atlas's own run, open while its detectors run: a Ctrl-C or a crash leaves it
    # interrupted or failed, never finished without its claims.
    run = stored.start_atlas(store, names, dets, default, top=top, prefix=prefix, dtype=dtype, resume=not fresh)
    with run.guard():
        results, runs, info = _run_models(specs, dets, store, fresh, cluster)
        summary = summarize(results, dets, top)
        add_claim_costs(summary, runs)
        labels = _labels(names)
        for name in names:
            summary["models"][name].update(label=labels[name], **info[name])
        ws = store.workspace.resolve()
        doc = {"workspace": str(ws), **summary, "runs": runs,
               "params": {d: atlas_params(d) for d in dets}}
        stored.finish_atlas(run, doc)
    if as_json:
        sys.stdout.write(stored.to_json(doc) + "\n")
        sys.stdout.flush()
    if not as_json:
        print_atlas(summary, labels)
        _print_overlaps(summary, labels)
        _print_costs(summary, labels)
        err.print(f"[dim]results: {ws}; atlas: run {run.id} (dashboard: interp app -w {ws}, Atlas)[/dim]",
                  highlight=False)
    failed = [f"{det} on {labels[m]}" for m, per in runs.items() for det, r in per.items() if "failed" in r]
    if failed:
        raise UserError(f"{len(failed)} run(s) failed ({', '.join(failed)}); rerun the same command to resume them")
