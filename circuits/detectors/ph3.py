"""PH3: pruning memory or context heads to steer knowledge conflicts (Jin et al. 2024).

Heads are ranked on the VALIDATION split by path patching (circuits.detectors.conflict_heads), pooled
over formats. Two directions:

- ``prune-context``: zero the top-k context heads, to raise the memory rate;
- ``prune-memory``: zero the top-k memory heads, to raise the context rate.

k is chosen per direction on the validation split from {1, 3, 5, 7, 9, 15} (as GaotangLi/JUICE)
by the target rate averaged over formats (ties: larger mean logit shift in the wanted
direction, then smaller k). The test split reports the rates before and after, plain factual
recall without the conflict sentence, and a control: ``n_random`` seeded draws of as many random
heads (``*.random-control.*`` rates are the mean over the draws; each draw's rates are the
``random_draws`` artifact) with the pruned set's percentile and empirical p among the draws
(circuits.detectors.ph3_draws). Each unpruned and pruned test rate carries its Wilson interval
over the items (the mean logit difference a t interval), and each target's change its paired
interval: pruned and unpruned answer the same items (Newcombe 1998, method 10).
Pruning = zero ablation of the head's z (its output before W_O) at every position.

Also value-vector scaling (Yu, Merullo, Pavlick 2023): the top heads' value vectors (= their z,
per query head) scaled by a factor, with the rates as a function of the factor.

``prune(model, heads)`` is a context manager that zeroes heads in every forward pass run inside
it (model.run, model.hf(...), generation); ``interp prune`` prints pruned vs unpruned text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import pandas as pd
import plotly.graph_objects as go
import torch
import typer

from circuits.data.conflicts import (
    ConflictConfig,
    ConflictDataset,
    ConflictItem,
    build_dataset,
    conflict_dataset,
    example_tokens,
    rates,
    score_items,
)
from circuits.data.facts import facts_hash, load_facts
from circuits.detectors.conflict_heads import mean_by_head, prefixed_head_scores, ranked_heads
from circuits.detectors.ph3_draws import (
    RATES,
    condition_intervals,
    control_draws,
    draw_records,
    evaluate_scored,
    versus_random,
)
from circuits.methods.decoding import greedy_decode
from circuits.methods.direct_path import head_effects, out_proj_module
from circuits.methods.heads import Head, check_heads, head_label
from interp.errors import UserError
from interp.model.interventions import AblateHeads, Intervention, ScaleValue, ablate_heads
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.config import MAX_DRAWS, SEED_MAX, param
from interp.runs.registry import Detector, Summary, UnitResult, register
from interp.runs.units import Unit
from interp.stats import Interval

K_GRID: tuple[int, ...] = (1, 3, 5, 7, 9, 15)
DIRECTIONS = {
    # direction: (heads pruned, target rate, sign of the wanted logit-difference shift)
    "prune-context": ("context", "memory_rate", 1.0),
    "prune-memory": ("memory", "context_rate", -1.0),
}


@contextlib.contextmanager
def prune(model: LoadedModel, heads: Sequence[Head]) -> Iterator[LoadedModel]:
    """Zero the outputs of ``heads`` (z, before W_O, every position) while the block runs.

    The zeroing is ``AblateHeads`` (zero), the intervention ``model.run`` applies, but installed
    as forward pre-hooks on each layer's output projection (whose input is z, heads
    concatenated), so it acts on every forward pass of the model: both backends, plain
    ``model.hf`` calls, generation. The hooks are removed on exit, also when the block raises.
    """
    ivs = [iv for iv in ablate_heads(check_heads(heads, model), "zero") if isinstance(iv, AblateHeads)]
    shape = (model.info.n_heads, model.info.d_head)
    handles = []

    def make_hook(iv: AblateHeads):
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            z = iv.apply(args[0].unflatten(-1, shape).clone(), {})
            return (z.flatten(-2), *args[1:])

        return hook

    try:
        for iv in ivs:
            handles.append(out_proj_module(model, iv.layer).register_forward_pre_hook(make_hook(iv)))
        yield model
    finally:
        for h in handles:
            h.remove()


def greedy_continuation(
    model: LoadedModel, prompt: str, max_new_tokens: int = 20, interventions: Sequence[Intervention] = ()
) -> str:
    """Greedy continuation of ``prompt`` (after the prompt prefix) until EOS (not included) or
    ``max_new_tokens``.

    ``interventions`` must act on every position alike (ablation, scaling): on the bridge the
    prefix is computed once and each step runs one token against HF's KV cache, so a
    position-indexed intervention would see step-local positions. Other backends recompute the
    whole prefix each step.
    """
    decoded = greedy_decode(model, model.to_tokens(prompt), max_new_tokens, interventions=interventions,
                            kv_cache=model.backend.capabilities.kv_cache)
    new = decoded.tokens[0][:-1] if decoded.stops[0] == "eos" else decoded.tokens[0]
    return str(model.tokenizer.decode(new))


def head_interventions(heads: Sequence[Head], factor: float = 0.0) -> list[Intervention]:
    """Prune (factor 0: zero ablation of z, as PH3) or scale the heads' value vectors."""
    if not heads:
        return []
    if float(factor) == 0.0:
        return ablate_heads(list(heads), "zero")
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    return [ScaleValue(layer=la, heads=tuple(hs), factor=float(factor)) for la, hs in sorted(by_layer.items())]


def compare_generations(
    model: LoadedModel, prompt: str, heads: Sequence[Head], factor: float = 0.0, max_new_tokens: int = 20
) -> dict[str, Any]:
    """Greedy continuations of one prompt by the unmodified model and with ``heads`` pruned
    (factor 0) or their value vectors scaled by ``factor``."""
    for layer, head in heads:
        model.check_head(layer, head)
    return {
        "heads": [head_label(la, h) for la, h in heads],
        "factor": float(factor),
        "variant": "prune (zero ablation)" if float(factor) == 0.0 else f"scale values x{float(factor):g}",
        "unmodified": greedy_continuation(model, prompt, max_new_tokens),
        "modified": greedy_continuation(model, prompt, max_new_tokens, head_interventions(heads, factor)),
    }


def compare_rates(
    model: LoadedModel,
    heads: Sequence[Head],
    factor: float = 0.0,
    *,
    formats: Sequence[str] = ("restated", "qa"),
    max_items: int = 24,
    seed: int = 0,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Memory / context rates of the unmodified and the modified model on the same conflict
    items (every kept item of a seeded draw from the shared facts; no split: a live check)."""
    for layer, head in heads:
        model.check_head(layer, head)
    ds = build_dataset(model, load_facts("auto"), seed=seed, max_items=max_items, batch_size=batch_size)
    items = ds.validation + ds.test
    ivs = head_interventions(heads, factor)
    rows = []
    for fmt in formats:
        for label, iv in (("unmodified", []), ("modified", ivs)):
            r = rates(score_items(model, items, fmt, iv, batch_size=batch_size))
            rows.append({"format": fmt, "model": label, "label": f"{fmt} / {label}", "n_items": len(items), **r})
    return pd.DataFrame(rows)


def ranking(
    model: LoadedModel, items: Sequence[ConflictItem], formats: Sequence[str], batch_size: int = 16
) -> pd.DataFrame:
    """Per-head path-patching scores pooled over formats (item-weighted) on the given items."""
    frames = [head_effects(model, items, f, batch_size) for f in formats]
    return mean_by_head(pd.concat(frames, ignore_index=True))


def evaluate(
    model: LoadedModel,
    items: Sequence[ConflictItem],
    formats: Sequence[str],
    heads: Sequence[Head],
    *,
    conflict: bool = True,
    batch_size: int = 32,
) -> dict[str, dict[str, float]]:
    """Rates per format with ``heads`` zero-ablated (none: the unpruned model)."""
    ivs = ablate_heads(list(heads), "zero") if heads else []
    return {f: rates(score_items(model, items, f, ivs, conflict=conflict, batch_size=batch_size)) for f in formats}


def _mean(res: Mapping[str, Mapping[str, float]], key: str) -> float:
    return sum(r[key] for r in res.values()) / len(res)


def select_k(
    model: LoadedModel,
    items: Sequence[ConflictItem],
    formats: Sequence[str],
    heads: Sequence[Head],
    direction: str,
    ks: Sequence[int] = K_GRID,
    batch_size: int = 32,
) -> tuple[int, pd.DataFrame]:
    """Choose k for one direction on ``items`` (the validation split). Returns (k, sweep)."""
    if direction not in DIRECTIONS:
        raise UserError(f"unknown PH3 direction {direction!r} (known: {', '.join(DIRECTIONS)})")
    if not heads:
        raise UserError(f"{direction}: no heads of that kind were found (all path-patching effects have the other sign)")
    _, target, sign = DIRECTIONS[direction]
    base = evaluate(model, items, formats, [], batch_size=batch_size)
    rows = []
    for k in sorted(set(ks)):
        kk = min(k, len(heads))
        res = evaluate(model, items, formats, heads[:kk], batch_size=batch_size)
        rows.append(
            {
                "direction": direction,
                "k": k,
                "k_used": kk,
                "target": target,
                "target_rate": _mean(res, target),
                "logit_shift": sign * (_mean(res, "mean_logit_diff") - _mean(base, "mean_logit_diff")),
                **{f"{f}.{target}": res[f][target] for f in formats},
            }
        )
    sweep = pd.DataFrame(rows)
    best = sweep.sort_values(["target_rate", "logit_shift", "k"], ascending=[False, False, True]).iloc[0]
    return int(best["k"]), sweep


def scaling_curve(
    model: LoadedModel,
    items: Sequence[ConflictItem],
    formats: Sequence[str],
    heads: Sequence[Head],
    factors: Sequence[float],
    batch_size: int = 32,
) -> pd.DataFrame:
    """Rates when one head's value vectors are scaled by each factor (ScaleValue on z)."""
    rows = []
    unscaled: dict[str, dict[str, float]] = {}
    for layer, head in heads:
        for factor in factors:
            ivs = [ScaleValue(layer=layer, heads=(head,), factor=float(factor))]
            for f in formats:
                if float(factor) == 1.0:
                    # Scaling by one is the unmodified model: computed once, shared by all heads.
                    if f not in unscaled:
                        unscaled[f] = rates(score_items(model, items, f, batch_size=batch_size))
                    r = unscaled[f]
                else:
                    r = rates(score_items(model, items, f, ivs, batch_size=batch_size))
                rows.append({"layer": layer, "head": head, "factor": float(factor), "format": f, **r})
    return pd.DataFrame(rows)


def scaling_figure(curve: pd.DataFrame, rate: str = "context_rate") -> go.Figure:
    fig = go.Figure()
    keys = pd.DataFrame(curve[["layer", "head", "format"]]).drop_duplicates().to_dict("records")
    for key in keys:
        mask = (curve["layer"] == key["layer"]) & (curve["head"] == key["head"]) & (curve["format"] == key["format"])
        g = pd.DataFrame(curve.loc[mask]).sort_values("factor")
        fig.add_scatter(
            x=g["factor"], y=g[rate], mode="lines+markers", name=f"L{key['layer']}H{key['head']} {key['format']}"
        )
    fig.update_layout(
        title=f"value-vector scaling: {rate.replace('_', ' ')} vs factor",
        xaxis_title="value scale factor",
        yaxis_title=f"{rate.replace('_', ' ')} (fraction of items, top-1)",
        yaxis_range=[0, 1],
    )
    return fig


@dataclass(frozen=True)
class PH3Config(ConflictConfig):
    """Parameters of ph3: the conflict dataset (ConflictConfig), then the k sweep and the scaling."""

    seed: int = param(0, "seed of the context answers, the split and the random-head control",
                      low=0, high=SEED_MAX)
    ks: tuple[int, ...] = param(K_GRID, "candidate k (heads pruned), chosen on validation", low=1)
    scale_heads: int = param(1, "top heads of each kind for the value-scaling curve (0 = none)", low=0)
    factors: tuple[float, ...] = param((0.0, 0.5, 1.0, 2.0, 4.0), "value-vector scale factors", unbounded=True)
    n_random: int = param(20, "draws of as many random heads as pruned (the control)", low=1, high=MAX_DRAWS)
    batch_size: int = param(32, "prompts per forward pass", low=1)

    def check(self) -> None:
        super().check()
        if not self.ks:
            raise UserError("no candidate k given in ks (e.g. 1,3,5)")
        if not self.factors:
            raise UserError("no scale factor given in factors (e.g. 0,0.5,1,2)")


@register
class PH3Detector(Detector[PH3Config]):
    name = "ph3"
    description = (
        "PH3 (Jin et al. 2024): prune top-k context heads (memory heads) to raise the memory (context) "
        "rate; k chosen on validation, rates on test; value-vector scaling curves"
    )
    output = "intervention"
    knowledge_conflict = True
    curve_axes: ClassVar[dict[str, tuple[str, str]]] = {
        "validation.*.memory_rate": ("k (heads pruned)", "memory rate (fraction of validation items, top-1)"),
        "validation.*.context_rate": ("k (heads pruned)", "context rate (fraction of validation items, top-1)"),
        "test.scale_value.*.memory_rate": ("value scale factor", "memory rate (fraction of test items, top-1)"),
        "test.scale_value.*.context_rate": ("value scale factor", "context rate (fraction of test items, top-1)"),
    }
    Config = PH3Config

    def variant(self, cfg: PH3Config) -> str:
        return "zero-ablation.direct-path-ranking"

    def method_text(self, cfg: PH3Config) -> str:
        return (
            "Zero ablation of each pruned head's z at all positions (PH3, Jin et al. 2024); heads ranked by "
            "direct-path patching to the logits on the validation split, k chosen there, rates on the test split, "
            f"against {cfg.n_random} draws of as many random heads (percentile and empirical p of the pruned set)."
        )

    def dataset(self, model: LoadedModel, cfg: PH3Config) -> ConflictDataset:
        return self.memo("dataset", model, cfg, lambda: conflict_dataset(model, cfg, cfg.batch_size))

    def heads(self, model: LoadedModel, cfg: PH3Config) -> tuple[pd.DataFrame, list[Head], list[Head]]:
        """(per-head scores on validation, memory heads, context heads), best first."""

        def compute() -> tuple[pd.DataFrame, list[Head], list[Head]]:
            ds = self.dataset(model, cfg)
            scores = ranking(model, ds.split("validation"), cfg.formats, cfg.batch_size)
            mem, ctx = ranked_heads(scores, "path_delta")
            return scores, mem, ctx

        return self.memo("heads", model, cfg, compute)

    def choices(self, model: LoadedModel, cfg: PH3Config) -> dict[str, tuple[int, pd.DataFrame]]:
        """Per direction: (the k chosen on validation, the sweep over ks)."""

        def compute() -> dict[str, tuple[int, pd.DataFrame]]:
            ds = self.dataset(model, cfg)
            _, mem, ctx = self.heads(model, cfg)
            pools = {"prune-context": ctx, "prune-memory": mem}
            return {
                d: select_k(model, ds.split("validation"), cfg.formats, pools[d], d, cfg.ks, cfg.batch_size)
                for d in DIRECTIONS
            }

        return self.memo("k", model, cfg, compute)

    def dataset_hash(self, model: LoadedModel, cfg: PH3Config) -> str | None:
        return facts_hash(cfg.facts)

    def example_tokens(self, model: LoadedModel, cfg: PH3Config) -> torch.Tensor | None:
        return example_tokens(model, cfg)

    def units(self, model: LoadedModel, cfg: PH3Config) -> list[Unit]:
        units = [Unit("select-k"), Unit("test")]
        return [*units, Unit("scaling")] if cfg.scale_heads > 0 else units

    def run_unit(self, model: LoadedModel, cfg: PH3Config, unit: Unit) -> UnitResult:
        ds = self.dataset(model, cfg)
        scores, mem, ctx = self.heads(model, cfg)
        if unit.group == "select-k":
            return self._select_k_unit(model, cfg, ds, scores)
        if unit.group == "test":
            return self._test_unit(model, cfg, ds.split("test"), mem, ctx)
        if unit.group == "scaling":
            heads = list(dict.fromkeys(mem[: cfg.scale_heads] + ctx[: cfg.scale_heads]))
            curve = scaling_curve(model, ds.split("test"), cfg.formats, heads, cfg.factors, cfg.batch_size)
            rows = (
                (f"test.scale_value.{f}.{rate}", int(layer), int(head), float(x), float(v), int(n))
                for rate in ("context_rate", "memory_rate")
                for f, layer, head, x, v, n in zip(curve["format"], curve["layer"], curve["head"], curve["factor"],
                                                   curve[rate], curve["n"], strict=True)
            )
            return UnitResult(tables={"curves": tables.rate_curves(rows)})
        raise UserError(f"unknown unit {unit}")

    def _select_k_unit(self, model: LoadedModel, cfg: PH3Config, ds: ConflictDataset, scores: pd.DataFrame) -> UnitResult:
        """The k sweep of each direction on validation (curves), the chosen k, the ranking."""
        choices = self.choices(model, cfg)
        sweep = pd.concat([s for _, s in choices.values()], ignore_index=True)
        curve = "validation." + sweep["direction"] + "." + sweep["target"]
        n = len(curve)
        return UnitResult(
            tables={
                "curves": tables.curves(
                    zip(curve, [None] * n, [None] * n, sweep["k"].astype(float), sweep["target_rate"], strict=True)
                ),
                "metrics": tables.metric_rows(
                    (f"{d}.k", float(k), None, None, len(ds.validation)) for d, (k, _) in choices.items()
                ),
                "head_scores": prefixed_head_scores(scores, "validation"),
            }
        )

    def _test_unit(
        self, model: LoadedModel, cfg: PH3Config, test: Sequence[ConflictItem], mem: list[Head], ctx: list[Head]
    ) -> UnitResult:
        """Test-split rates unpruned, pruned with the chosen k, and with as many random heads in
        each of ``n_random`` draws, on conflict and on no-conflict prompts; every head set is
        scored as rows of shared batches (circuits.detectors.ph3_draws)."""
        conditions: dict[str, list[Head]] = {"unpruned": []}
        draws: dict[str, list[list[Head]]] = {}
        for d, (k, _) in self.choices(model, cfg).items():
            pool = ctx if DIRECTIONS[d][0] == "context" else mem
            conditions[d] = pool[:k]
            draws[d] = control_draws(model, pool[:k], cfg.n_random, cfg.seed)
        sets = {**conditions, **{f"{d}.draw{i}": hs for d, ds in draws.items() for i, hs in enumerate(ds)}}
        scored = {("conflict" if conflict else "no-conflict"): evaluate_scored(
            model, test, cfg.formats, sets, conflict=conflict, batch_size=cfg.batch_size) for conflict in (True, False)}
        res = {setting: {name: {f: rates(frame) for f, frame in by_f.items()} for name, by_f in by_set.items()}
               for setting, by_set in scored.items()}
        ivs = condition_intervals(scored, list(conditions), {d: DIRECTIONS[d][1] for d in draws})
        records = [r for d, ds in draws.items() for r in draw_records(d, ds, res)]
        rows = []
        for setting, by_cond in res.items():
            for cond in conditions:
                for f, r in by_cond[cond].items():
                    rows += [(f"test.{cond}.{setting}.{f}.{name}", float(v), None, None, int(r["n"]))
                             for name, v in r.items() if name != "n"]
            # The random control's rates: the mean over the draws (each draw is in random_draws).
            for d, ds in draws.items():
                for f in cfg.formats:
                    rs = [by_cond[f"{d}.draw{i}"][f] for i in range(len(ds))]
                    rows += [(f"test.{d}.random-control.{setting}.{f}.{name}", sum(r[name] for r in rs) / len(rs),
                              None, None, int(rs[0]["n"])) for name in RATES]
        art = {c: [head_label(*h) for h in hs] for c, hs in conditions.items()}
        return UnitResult(tables={"metrics": tables.metric_rows(rows), "artifacts": pd.concat(
            [tables.artifact("pruned_heads", art), tables.artifact("random_draws", records),
             tables.artifact("intervals", {name: iv.to_dict() for name, iv in ivs.items()})], ignore_index=True)})

    def finalize(self, model: LoadedModel, cfg: PH3Config, results: Mapping[str, pd.DataFrame]) -> Summary:
        met = results["metrics"]
        metrics: dict[str, Any] = dict(
            zip(met["name"].astype(str).tolist(), met["value"].astype(float).tolist(), strict=True)
        )
        for d in DIRECTIONS:
            metrics[f"{d}.k"] = int(metrics[f"{d}.k"])
        # The headline numbers: target rate before and after, per format, on the test split.
        for d, (_, target, _) in DIRECTIONS.items():
            for f in cfg.formats:
                before = metrics[f"test.unpruned.conflict.{f}.{target}"]
                after = metrics[f"test.{d}.conflict.{f}.{target}"]
                metrics[f"test.{d}.{f}.{target}_change"] = after - before
        ds = self.dataset(model, cfg)
        split = ds.split_record()
        art = results.get("artifacts")
        pruned: dict[str, list[str]] = (tables.read_artifact(art, "pruned_heads") if art is not None else None) or {}
        for cond, hs in pruned.items():
            metrics[f"heads.{cond}"] = ",".join(hs)
        draws = (tables.read_artifact(art, "random_draws") if art is not None else None) or []
        # A test unit stored before the intervals has none: its rates stay points.
        stored = (tables.read_artifact(art, "intervals") if art is not None else None) or {}
        intervals = {name: Interval.from_dict(doc) for name, doc in stored.items()}
        metrics["n_random"] = cfg.n_random
        for d, (_, target, _) in DIRECTIONS.items():
            after = {f: metrics[f"test.{d}.conflict.{f}.{target}"] for f in cfg.formats}
            metrics.update(versus_random(draws, after, d, target, cfg.formats))
        metrics.update(
            {"seed": cfg.seed, "split_hash": split["hash"], "n_validation": len(ds.validation), "n_test": len(ds.test),
             "formats": list(cfg.formats)}
        )
        selection = {
            "variant": self.variant(cfg),
            "k_grid": list(cfg.ks),
            "selection": "max validation target rate averaged over formats; ties: logit shift, then smaller k",
            "chosen_k": {d: metrics[f"{d}.k"] for d in DIRECTIONS},
            "pruned_heads": pruned,
        }
        out: dict[str, pd.DataFrame] = {
            "metrics": tables.metrics(metrics),
            "artifacts": pd.concat(
                [tables.artifact("split", split), tables.artifact("selection", selection)], ignore_index=True
            ),
        }
        # The units' curves and ranking, carried into the final tables as they are.
        for table in ("curves", "head_scores"):
            frame = results.get(table)
            if frame is not None and len(frame):
                out[table] = pd.DataFrame(frame[tables.columns(table)])
        return Summary(metrics=metrics, intervals=intervals, tables=out)


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="zoo name, local HF folder or hub id")]


