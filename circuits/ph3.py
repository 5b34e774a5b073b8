"""PH3: pruning memory or context heads to steer knowledge conflicts (Jin et al. 2024).

Heads are ranked on the VALIDATION split by path patching (circuits.conflict_heads), pooled
over formats. Two directions:

- ``prune-context``: zero the top-k context heads, to raise the memory rate;
- ``prune-memory``: zero the top-k memory heads, to raise the context rate.

k is chosen per direction on the validation split from {1, 3, 5, 7, 9, 15} (as GaotangLi/JUICE)
by the target rate averaged over formats (ties: larger mean logit shift in the wanted
direction, then smaller k). The test split reports the rates before and after, the same k of
seeded random heads as a control, and plain factual recall without the conflict sentence.
Pruning = zero ablation of the head's z (its output before W_O) at every position.

Also value-vector scaling (Yu, Merullo, Pavlick 2023): the top heads' value vectors (= their z,
per query head) scaled by a factor, with the rates as a function of the factor.

``prune(model, heads)`` is a context manager that zeroes heads in every forward pass run inside
it (model.run, model.hf(...), generation); ``interp prune`` prints pruned vs unpruned text.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Annotated, Any, ClassVar

import pandas as pd
import plotly.graph_objects as go
import torch
import typer

from circuits.conflict_heads import (
    head_effects,
    mean_by_head,
    out_proj_module,
    ranked_heads,
)
from circuits.conflicts import (
    DATASET_PARAMS,
    METRIC_COLUMNS,
    ConflictDataset,
    ConflictItem,
    build_dataset,
    parse_formats,
    rates,
    score_items,
)
from circuits.decoding import greedy_decode
from circuits.facts import facts_hash, load_facts
from circuits.heads import all_heads, check_heads, head_label, parse_heads, random_heads
from interp.errors import UserError
from interp.interventions import AblateHeads, Intervention, ScaleValue, ablate_heads
from interp.model import LoadedModel
from interp.registry import SEED_MAX, Detector, Param, Summary, UnitResult, command, register

K_GRID: tuple[int, ...] = (1, 3, 5, 7, 9, 15)
DIRECTIONS = {
    # direction: (heads pruned, target rate, sign of the wanted logit-difference shift)
    "prune-context": ("context", "memory_rate", 1.0),
    "prune-memory": ("memory", "context_rate", -1.0),
}
Head = tuple[int, int]


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


def greedy_generate(
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
        "unmodified": greedy_generate(model, prompt, max_new_tokens),
        "modified": greedy_generate(model, prompt, max_new_tokens, head_interventions(heads, factor)),
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


def parse_factors(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"bad factors {text!r}: give comma-separated numbers, e.g. 0,0.5,1,2") from None
    if not out:
        raise UserError("no scaling factors given")
    if not all(math.isfinite(f) for f in out):
        raise UserError(f"bad factors {text!r}: every factor must be a finite number")
    return out


def parse_ks(text: str) -> list[int]:
    """'1,3,5' -> [1, 3, 5]: the candidate k of the PH3 sweep, positive integers."""
    try:
        ks = [int(k) for k in str(text).split(",") if k.strip()]
    except ValueError:
        raise UserError(f"bad ks {text!r}: give comma-separated integers") from None
    if not ks or min(ks) < 1:
        raise UserError(f"ks must be positive integers, got {text!r}")
    return ks


@register
class PH3Detector(Detector):
    name = "ph3"
    description = (
        "PH3 (Jin et al. 2024): prune top-k context heads (memory heads) to raise the memory (context) "
        "rate; k chosen on validation, rates on test; value-vector scaling curves"
    )
    kind = "intervention"
    curve_axes: ClassVar[dict[str, tuple[str, str]]] = {
        "validation.*.memory_rate": ("k (heads pruned)", "memory rate (fraction of validation items, top-1)"),
        "validation.*.context_rate": ("k (heads pruned)", "context rate (fraction of validation items, top-1)"),
        "test.scale_value.*.memory_rate": ("value scale factor", "memory rate (fraction of test items, top-1)"),
        "test.scale_value.*.context_rate": ("value scale factor", "context rate (fraction of test items, top-1)"),
    }
    params = (
        Param("seed", int, 0, "seed of the context answers, the split and the random-head control",
              low=0, high=SEED_MAX),
        *DATASET_PARAMS,
        Param("ks", str, "1,3,5,7,9,15", "candidate k (heads pruned), chosen on validation"),
        Param("scale_heads", int, 1, "top heads of each kind for the value-scaling curve (0 = none)", low=0),
        Param("factors", str, "0,0.5,1,2,4", "value-vector scale factors"),
        Param("batch_size", int, 32, "prompts per forward pass", low=1),
    )

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        parse_formats(params["formats"])
        parse_ks(params["ks"])
        parse_factors(params["factors"])

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, ...], Any] = {}

    def variant(self, params: Mapping[str, Any]) -> str:
        return "zero-ablation(z, all positions); heads ranked by direct-path patching on validation"

    def _key(self, model: LoadedModel, params: Mapping[str, Any], what: str) -> tuple[Any, ...]:
        return (what, id(model), json.dumps(dict(params), sort_keys=True))

    def dataset(self, model: LoadedModel, params: Mapping[str, Any]) -> ConflictDataset:
        key = self._key(model, params, "dataset")
        if key not in self._memo:
            self._memo[key] = build_dataset(
                model,
                load_facts(params["facts"]),
                seed=params["seed"],
                val_fraction=params["val_fraction"],
                max_items=params["max_items"],
                batch_size=params["batch_size"],
            )
        return self._memo[key]

    def heads(self, model: LoadedModel, params: Mapping[str, Any]) -> tuple[pd.DataFrame, list[Head], list[Head]]:
        key = self._key(model, params, "heads")
        if key not in self._memo:
            ds = self.dataset(model, params)
            scores = ranking(model, ds.split("validation"), parse_formats(params["formats"]), params["batch_size"])
            mem, ctx = ranked_heads(scores, "path_delta")
            self._memo[key] = (scores, mem, ctx)
        return self._memo[key]

    def choices(self, model: LoadedModel, params: Mapping[str, Any]) -> dict[str, tuple[int, pd.DataFrame]]:
        key = self._key(model, params, "k")
        if key not in self._memo:
            ds = self.dataset(model, params)
            _, mem, ctx = self.heads(model, params)
            formats = parse_formats(params["formats"])
            ks = parse_ks(params["ks"])
            pools = {"prune-context": ctx, "prune-memory": mem}
            self._memo[key] = {
                d: select_k(model, ds.split("validation"), formats, pools[d], d, ks, params["batch_size"])
                for d in DIRECTIONS
            }
        return self._memo[key]

    def dataset_hash(self, model: LoadedModel, params: Mapping[str, Any]) -> str | None:
        return facts_hash(params["facts"])

    def units(self, model: LoadedModel, params: Mapping[str, Any]) -> list[str]:
        parse_formats(params["formats"])
        parse_ks(params["ks"])
        parse_factors(params["factors"])
        if params["max_items"] < 0 or params["scale_heads"] < 0 or params["batch_size"] < 1:
            raise UserError("max_items and scale_heads must be >= 0, batch_size >= 1")
        units = ["select-k", "test"]
        return [*units, "scaling"] if params["scale_heads"] > 0 else units

    def run_unit(self, model: LoadedModel, params: Mapping[str, Any], unit: str) -> UnitResult:
        formats = parse_formats(params["formats"])
        ds = self.dataset(model, params)
        scores, mem, ctx = self.heads(model, params)
        bs = params["batch_size"]
        if unit == "select-k":
            choices = self.choices(model, params)
            sweep = pd.concat([s for _, s in choices.values()], ignore_index=True)
            curves = pd.DataFrame(
                {
                    "curve": "validation." + sweep["direction"] + "." + sweep["target"],
                    "layer": None,
                    "head": None,
                    "x": sweep["k"].astype(float),
                    "y": sweep["target_rate"],
                }
            )
            metrics = [(f"{d}.k", float(k), None, None, len(ds.validation)) for d, (k, _) in choices.items()]
            long = pd.DataFrame(scores.melt(id_vars=["layer", "head"], var_name="metric", value_name="value"))
            long["metric"] = "validation." + long["metric"].astype(str)
            return UnitResult(
                tables={
                    "curves": curves,
                    "metrics": pd.DataFrame(metrics, columns=METRIC_COLUMNS),
                    "head_scores": pd.DataFrame(long[["metric", "layer", "head", "value"]]),
                }
            )
        if unit == "test":
            choices = self.choices(model, params)
            test = ds.split("test")
            conditions: dict[str, list[Head]] = {"unpruned": []}
            for d, (k, _) in choices.items():
                pool = ctx if DIRECTIONS[d][0] == "context" else mem
                conditions[d] = pool[:k]
                # As many random heads as pruned (all that are left, on a model that small).
                n = min(len(pool[:k]), model.info.n_total_heads - len(pool[:k]))
                conditions[f"{d}.random-control"] = random_heads(
                    all_heads(model), pool[:k], n, random.Random(params["seed"])
                )
            rows = []
            for cond, heads in conditions.items():
                for conflict in (True, False):
                    res = evaluate(model, test, formats, heads, conflict=conflict, batch_size=bs)
                    setting = "conflict" if conflict else "no-conflict"
                    for f, r in res.items():
                        n = int(r["n"])
                        for name, v in r.items():
                            if name != "n":
                                rows.append((f"test.{cond}.{setting}.{f}.{name}", float(v), None, None, n))
            art = {c: [head_label(*h) for h in hs] for c, hs in conditions.items()}
            return UnitResult(
                tables={
                    "metrics": pd.DataFrame(rows, columns=METRIC_COLUMNS),
                    "artifacts": pd.DataFrame({"name": ["pruned_heads"], "json": [art]}),
                }
            )
        if unit == "scaling":
            top = params["scale_heads"]
            heads = list(dict.fromkeys(mem[:top] + ctx[:top]))
            curve = scaling_curve(model, ds.split("test"), formats, heads, parse_factors(params["factors"]), bs)
            frames = []
            for rate in ("context_rate", "memory_rate"):
                frames.append(
                    pd.DataFrame(
                        {
                            "curve": "test.scale_value." + curve["format"] + "." + rate,
                            "layer": curve["layer"],
                            "head": curve["head"],
                            "x": curve["factor"],
                            "y": curve[rate],
                        }
                    )
                )
            return UnitResult(tables={"curves": pd.concat(frames, ignore_index=True)})
        raise UserError(f"unknown unit {unit!r}")

    def finalize(
        self, model: LoadedModel, params: Mapping[str, Any], results: Mapping[str, pd.DataFrame]
    ) -> Summary:
        met = pd.DataFrame(results["metrics"])
        metrics: dict[str, Any] = dict(
            zip(met["name"].astype(str).tolist(), met["value"].astype(float).tolist(), strict=True)
        )
        for d in DIRECTIONS:
            metrics[f"{d}.k"] = int(metrics[f"{d}.k"])
        formats = parse_formats(params["formats"])
        # The headline numbers: target rate before and after, per format, on the test split.
        for d, (_, target, _) in DIRECTIONS.items():
            for f in formats:
                before = metrics[f"test.unpruned.conflict.{f}.{target}"]
                after = metrics[f"test.{d}.conflict.{f}.{target}"]
                metrics[f"test.{d}.{f}.{target}_change"] = after - before
        ds = self.dataset(model, params)
        split = ds.split_record()
        art = pd.DataFrame(results.get("artifacts", pd.DataFrame(columns=["name", "json"])))
        pruned: dict[str, list[str]] = {}
        cells = [c for n, c in zip(art["name"].tolist(), art["json"].tolist(), strict=True) if n == "pruned_heads"]
        if cells:
            pruned = json.loads(cells[0]) if isinstance(cells[0], str) else cells[0]
        for cond, hs in pruned.items():
            metrics[f"heads.{cond}"] = ",".join(hs)
        metrics.update(
            {
                "seed": params["seed"],
                "split_hash": split["hash"],
                "n_validation": len(ds.validation),
                "n_test": len(ds.test),
            }
        )
        numeric = [(k, float(v), None, None, None) for k, v in metrics.items() if isinstance(v, int | float)]
        settings = {
            "variant": self.variant(params),
            "k_grid": params["ks"],
            "selection": "max validation target rate averaged over formats; ties: logit shift, then smaller k",
            "chosen_k": {d: metrics[f"{d}.k"] for d in DIRECTIONS},
            "pruned_heads": pruned,
        }
        curves = results.get("curves", pd.DataFrame())
        hs = results.get("head_scores", pd.DataFrame())
        tables: dict[str, pd.DataFrame] = {
            "metrics": pd.DataFrame(numeric, columns=METRIC_COLUMNS),
            "artifacts": pd.DataFrame({"name": ["split", "settings"], "json": [split, settings]}),
        }
        if len(curves):
            tables["curves"] = curves.drop(columns=["unit"], errors="ignore")
        if len(hs):
            tables["head_scores"] = hs.drop(columns=["unit"], errors="ignore")
        return Summary(detector=self.name, variant=self.variant(params), metrics=metrics, tables=tables)


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="zoo name, local HF folder or hub id")]


@command("prune")
def prune_command(
    heads: Annotated[str, typer.Option("--heads", help="heads to prune, LAYER.HEAD comma-separated, e.g. 20.3,25.1")],
    prompt: Annotated[str, typer.Option("--prompt", help="prompt to continue (after the prompt prefix)")],
    model: ModelOpt = "smollm2-135m",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens to generate")] = 20,
    backend: Annotated[str, typer.Option("--backend", help="hook backend: bridge or nnsight")] = "bridge",
    prefix: Annotated[str, typer.Option("--prefix", help="token prompts start with: auto, none or a token")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
) -> None:
    """Generate with the given heads pruned (zeroed), next to the unpruned generation."""
    import sys

    import interp

    if not prompt.strip():
        raise UserError("empty prompt")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    parse_heads(heads)
    loaded = interp.load_model(model, backend=backend, prefix=prefix)
    hs = parse_heads(heads, loaded)
    unpruned = greedy_generate(loaded, prompt, max_new_tokens)
    with prune(loaded, hs):
        pruned = greedy_generate(loaded, prompt, max_new_tokens)
    labels = [head_label(*h) for h in hs]
    if as_json:
        out = {"model": loaded.name, "prompt": prompt, "heads": labels, "unpruned": unpruned, "pruned": pruned,
               "ablation": "zero"}
        sys.stdout.write(json.dumps(out) + "\n")
        return
    typer.echo(f"prompt:   {prompt!r}")
    typer.echo(f"unpruned: {unpruned!r}")
    typer.echo(f"pruned ({', '.join(labels)}; zero ablation): {pruned!r}")
