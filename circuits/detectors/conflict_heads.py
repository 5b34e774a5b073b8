"""Memory heads and context heads under knowledge conflicts (Jin et al. 2024; path patching as in Wang et al. 2022).

Metric: logit(memory) - logit(context) at the last position of the conflict prompt.

Path patching of a head to the logits (the detector's ranking). For each query head (l, h):
its output at the final position is taken from the no-conflict run (the same query without the
counterfactual sentence, aligned at the final position) and sent into the conflict run along its
DIRECT path only: every other head, every MLP and every later layer stays frozen at its
conflict-run value. The receiver is the final residual stream at the last position, so the
patched final residual is exactly

    r' = r_conflict + (z_noconflict[l, h] - z_conflict[l, h]) @ W_O[l, h]

(the output bias cancels), and the logits are read through the final norm and the unembedding.
Only the final position matters: a head's output at another position has no direct path to the
last position's logits. Two variants of the final norm:

- ``recomputed`` (default, as Wang et al.'s path patching, where the receiver input is patched and
  everything after it is recomputed): logits' = unembed(norm(r')).
- ``frozen``: the norm's scale (RMS, or LayerNorm's std) stays at the conflict run's value, so the
  effect is linear: the direct logit attribution of the head's output difference.

Sign: ``path_delta`` = metric(patched) - metric(conflict). A head whose conflict-run output pushes
towards the memory answer more than its no-conflict output has ``path_delta`` < 0 (patching it
away lowers the metric): a memory head. ``path_delta`` > 0: the head's conflict-specific output
pushes towards the context answer: a context head. The ranking score is
``memory_score = -path_delta`` (pooled over formats); context heads are those with the most
negative memory score.

Also per head (not only the difference, since a head can push both answers): the effect on
logit(memory) and on logit(context) separately, and the direct logit attribution of its
conflict-run output (frozen norm) to each answer.

Total-effect patching (option): the same activation (z of head (l, h) at the final position) is
patched from the no-conflict run with everything downstream recomputed, one batch row per head;
its ranking is compared with path patching by Spearman correlation and top-k overlap.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from scipy.stats import spearmanr

from circuits.data.conflicts import (
    RATE_INTERVALS,
    ConflictConfig,
    ConflictDataset,
    conflict_dataset,
    example_tokens,
    rate_intervals,
    score_items,
)
from circuits.data.facts import facts_hash
from circuits.methods.direct_path import FROZEN, head_effects, total_effects
from circuits.methods.heads import head_label
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.config import param
from interp.runs.registry import Detector, Summary, UnitResult, register
from interp.runs.units import Part, Unit
from interp.stats import Interval, wilson_counts


def rank_agreement(a: pd.Series, b: pd.Series, top: int = 10) -> dict[str, float]:
    """Spearman correlation of two per-head scores, and the overlap of their top-k heads at
    both ends (memory end: most negative delta; context end: most positive)."""
    a, b = a.align(b, join="inner")
    if len(a) < 2:
        raise UserError("rank agreement needs at least two heads")
    rho = float(spearmanr(a.to_numpy(), b.to_numpy()).statistic)  # type: ignore[attr-defined]
    k = min(top, len(a))
    mem = len(set(a.nsmallest(k).index) & set(b.nsmallest(k).index)) / k
    ctx = len(set(a.nlargest(k).index) & set(b.nlargest(k).index)) / k
    return {"spearman": rho, f"top{k}_overlap_memory": mem, f"top{k}_overlap_context": ctx}


def ranked_heads(scores: pd.DataFrame, column: str = "path_delta") -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(memory heads, context heads) from per-head mean deltas: memory heads have negative
    delta (most negative first), context heads positive (largest first)."""
    rows = sorted(
        zip(scores[column].astype(float).tolist(), scores["layer"].astype(int).tolist(),
            scores["head"].astype(int).tolist(), strict=True)
    )
    mem = [(layer, h) for v, layer, h in rows if v < 0]
    ctx = [(layer, h) for v, layer, h in reversed(rows) if v > 0]
    return mem, ctx


def _wide(long: pd.DataFrame) -> pd.DataFrame:
    """score_name/layer/head/value rows -> one row per head, one column per score."""
    return pd.DataFrame(
        long.pivot_table(index=["layer", "head"], columns="score_name", values="value").reset_index()
    )


def _col(frame: pd.DataFrame, name: str) -> pd.Series:
    return pd.Series(frame[name])


def mean_by_head(per_item: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in per_item.columns if c not in ("item", "layer", "head")]
    return pd.DataFrame(per_item.groupby(["layer", "head"], as_index=False)[cols].mean())


def head_map_figure(scores: pd.DataFrame, column: str, title: str) -> go.Figure:
    """Layer x head heatmap of one per-head score (diverging, centred at zero)."""
    grid = scores.pivot_table(index="layer", columns="head", values=column).sort_index()
    lim = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=[str(c) for c in grid.columns],
            y=[str(i) for i in grid.index],
            colorscale="RdBu",
            zmin=-lim,
            zmax=lim,
            colorbar={"title": column},
        )
    )
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", height=600)
    return fig


def rates_figure(table: pd.DataFrame, title: str = "memory vs context rates") -> go.Figure:
    """Grouped bars of memory / context / other rate per row label (format, split, condition),
    each with its Wilson interval where the table has the number of items (``n_items`` or ``n``)."""
    label = table["label"] if "label" in table else table["format"] + " / " + table["split"]
    n_col = next((c for c in ("n_items", "n") if c in table), None)
    fig = go.Figure()
    for col, name in (("memory_rate", "memory"), ("context_rate", "context"), ("other_rate", "neither")):
        bars = None
        if n_col is not None:
            ivs = [wilson_counts(round(r * n), int(n)) for r, n in zip(table[col], table[n_col], strict=True)]
            bars = {"type": "data", "symmetric": False, "array": [iv.hi - iv.value for iv in ivs],
                    "arrayminus": [iv.value - iv.lo for iv in ivs]}
        fig.add_bar(x=label, y=table[col], name=name, error_y=bars)
    fig.update_layout(barmode="group", title=title, xaxis_title="condition" if "label" in table else "prompt format / split",
                      yaxis_title="rate (fraction of items, top-1)", yaxis_range=[0, 1])
    return fig


# ---------------------------------------------------------------- the detector


@dataclass(frozen=True)
class ConflictHeadsConfig(ConflictConfig):
    """Parameters of conflict-heads: the conflict dataset (ConflictConfig), then the patching."""

    norm: Literal["recomputed", "frozen"] = param("recomputed", "final norm in path patching: recomputed or frozen")
    total_effect: bool = param(False, "also run total-effect patching (downstream recomputed)")
    total_items: int = param(4, "validation items per format for total-effect patching", low=1)
    # Not "top": `interp run --top` is the CLI's own option (rows of the printed table).
    n_top: int = param(10, "heads per kind listed in the metrics and used for top-k overlap", low=1)
    batch_size: int = param(16, "prompts per forward pass", low=1)


def _rank_column(cfg: ConflictHeadsConfig) -> str:
    return "path_delta" if cfg.norm == "recomputed" else "path_delta_frozen_norm"


def prefixed_head_scores(scores: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Per-head scores (one column per score) as ``head_scores`` rows, metric "<prefix>.<score>"."""
    long = pd.DataFrame(scores.melt(id_vars=["layer", "head"], var_name="metric", value_name="value"))
    metric = prefix + "." + long["metric"].astype(str)
    return tables.head_scores(zip(metric, long["layer"], long["head"], long["value"], strict=True))


def _pooled(
    hs: pd.DataFrame, formats: Mapping[str, str], n_items: Mapping[str, float]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the units' head scores with their format, taken from the unit that wrote them
    (``formats``: unit key -> format), and their score name, the scores pooled over formats
    weighted by each format's number of patched items: score_name/layer/head/value rows)."""
    hs = hs.copy()
    hs["format"] = [formats[u] for u in hs["unit"].astype(str)]
    # A unit names its scores "<format>.<score>" (prefixed_head_scores), its own format known.
    hs["score_name"] = [m.removeprefix(f"{f}.") for m, f in zip(hs["metric"].astype(str), hs["format"], strict=True)]
    hs["w"] = [n_items[f] for f in hs["format"].tolist()]
    hs["wv"] = hs["value"] * hs["w"]
    pooled = pd.DataFrame(hs.groupby(["score_name", "layer", "head"], as_index=False)[["wv", "w"]].sum())
    pooled["value"] = pooled["wv"] / pooled["w"]
    return hs, pooled


def _ranking(pooled: pd.DataFrame, rank_col: str) -> pd.DataFrame:
    """One row per head with every pooled score and ``memory_score`` = -rank_col, best first."""
    wide = _wide(pooled)
    wide["memory_score"] = -wide[rank_col]
    return wide.sort_values("memory_score", ascending=False).reset_index(drop=True)


def _top_head_metrics(wide: pd.DataFrame, rank_col: str, n_top: int, n_layers: int) -> dict[str, Any]:
    """The top memory and context heads and their mean layer (Jin et al. 2024 find both late)."""
    mem_heads, ctx_heads = ranked_heads(wide, rank_col)
    out: dict[str, Any] = {
        "top_memory_heads": ",".join(head_label(*h) for h in mem_heads[:n_top]),
        "top_context_heads": ",".join(head_label(*h) for h in ctx_heads[:n_top]),
    }
    for kind, heads in (("memory", mem_heads[:n_top]), ("context", ctx_heads[:n_top])):
        if heads:
            out[f"mean_layer_top_{kind}_heads"] = float(np.mean([layer for layer, _ in heads]))
    out["n_layers"] = n_layers
    return out


def _agreement_metrics(
    hs: pd.DataFrame, wide: pd.DataFrame, rank_col: str, cfg: ConflictHeadsConfig
) -> dict[str, Any]:
    """Rank agreement of path patching with total-effect patching (pooled and per format, when
    run) and of the recomputed with the frozen final norm."""
    out: dict[str, Any] = {}
    idx = wide.set_index(["layer", "head"])
    if cfg.total_effect:
        for k, v in rank_agreement(_col(idx, rank_col), _col(idx, "total_delta"), cfg.n_top).items():
            out[f"path_vs_total.{k}"] = v
        for f in cfg.formats:
            sub = _wide(pd.DataFrame(hs.loc[hs["format"] == f])).set_index(["layer", "head"])
            for k, v in rank_agreement(_col(sub, rank_col), _col(sub, "total_delta"), cfg.n_top).items():
                out[f"{f}.path_vs_total.{k}"] = v
    # The frozen and recomputed final norm differ only by the norm's response to the patch;
    # their agreement shows how far the linear (DLA-like) reading can be trusted.
    out["norm_recomputed_vs_frozen.spearman"] = rank_agreement(
        _col(idx, "path_delta"), _col(idx, "path_delta_frozen_norm"), cfg.n_top
    )["spearman"]
    return out


def _dataset_metrics(ds: ConflictDataset, seed: int, split: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The split's sizes and hash, and a warning for items scored on first tokens only."""
    n_unequal = sum(not i.equal_token_count for i in ds.validation + ds.test)
    metrics = {
        "seed": seed,
        "split_hash": split["hash"],
        "n_validation": len(ds.validation),
        "n_test": len(ds.test),
        "n_facts": ds.n_facts,
        "n_known_facts": ds.n_known,
        "n_unequal_token_count": n_unequal,
    }
    warnings = []
    if n_unequal:
        warnings.append(
            f"{n_unequal} items have answers of different token counts; "
            "they are scored on the first token of each answer"
        )
    return metrics, warnings


def _head_rows(wide: pd.DataFrame) -> list[dict[str, Any]]:
    """The summary's heads, best memory head first, with every pooled score."""
    score_cols = [str(c) for c in wide.columns if c not in ("layer", "head", "memory_score")]
    return [
        {
            "layer": int(r["layer"]),
            "head": int(r["head"]),
            "score": float(r["memory_score"]),
            "role": "memory" if float(r["memory_score"]) > 0 else "context",
            **{c: float(r[c]) for c in score_cols},
        }
        for r in wide.to_dict("records")
    ]


def _bound(x: float) -> float | None:
    return None if math.isnan(x) else x


def _rate_intervals(met: pd.DataFrame, formats: Sequence[str]) -> dict[str, Interval]:
    """The answer rates' intervals as the units stored them (by format and split), each named
    like its metric; a run stored before the intervals has nan bounds for the logit difference,
    and its rates get their Wilson interval from the stored rate and n."""
    rows = met.set_index("name")
    out: dict[str, Interval] = {}
    for fmt in formats:
        for split in ("validation", "test"):
            for score, method in RATE_INTERVALS.items():
                name = f"{fmt}.{split}.{score}"
                if name not in rows.index:
                    continue
                r = rows.loc[name]
                value, n = float(r["value"]), int(r["n"])
                if method == "wilson":
                    out[name] = wilson_counts(round(value * n), n)
                else:
                    lo, hi = (float("nan") if pd.isna(r[c]) else float(r[c]) for c in ("ci_low", "ci_high"))
                    out[name] = Interval(value, lo, hi, n, method, 0.95)
    return out


def _final_head_scores(hs: pd.DataFrame, pooled: pd.DataFrame, wide: pd.DataFrame) -> pd.DataFrame:
    """Per-format scores as the units wrote them, then "pooled.<score>" and pooled.memory_score."""

    def rows(metric: Any, frame: pd.DataFrame) -> Iterator[tuple[Any, ...]]:
        return zip(metric, frame["layer"], frame["head"], frame["value"], strict=True)

    mem = wide.assign(value=wide["memory_score"])
    return tables.head_scores(
        chain(
            rows(hs["metric"], hs),
            rows("pooled." + pooled["score_name"], pooled),
            rows(["pooled.memory_score"] * len(mem), mem),
        )
    )


@register
class ConflictHeadsDetector(Detector[ConflictHeadsConfig]):
    name = "conflict-heads"
    description = (
        "Memory heads vs context heads under knowledge conflicts: path patching of each head to the "
        "logits (Jin et al. 2024), per-answer direct effects, optional total-effect patching"
    )
    output = "head_scores"
    knowledge_conflict = True
    head_columns: ClassVar[dict[str, str]] = {"role": "role", "path_delta": "path", "dla_diff": "dla", "total_delta": "total",
                    "path_delta_memory_logit": "mem logit", "path_delta_context_logit": "ctx logit"}
    # The default scan patches a seeded subset of 16 known items (8 validation, 8 test) instead of
    # 80, so the Conflicts page has memory/context rates and head maps after the first scan.
    in_default_scan = True
    scan_params: ClassVar[dict[str, Any]] = {"max_items": 16}
    Config = ConflictHeadsConfig

    def variant(self, cfg: ConflictHeadsConfig) -> str:
        v = f"direct-path.{cfg.norm}-norm"
        return v + "+total-effect" if cfg.total_effect else v

    def method_text(self, cfg: ConflictHeadsConfig) -> str:
        norm = ("recomputed on the patched residual" if cfg.norm == "recomputed"
                else "with its scale frozen at the conflict run's value (linear, DLA-like)")
        text = (
            "Path patching (Wang et al. 2022) of each head's output at the final position from the "
            "no-conflict run into the conflict run along its direct path to the logits only, final "
            f"norm {norm}; memory vs context heads ranked on the validation split (Jin et al. 2024)."
        )
        if cfg.total_effect:
            text += (" Also total-effect patching of the same activation (final position) with "
                     "everything downstream recomputed.")
        return text

    def dataset(self, model: LoadedModel, cfg: ConflictHeadsConfig) -> ConflictDataset:
        return self.memo("dataset", model, cfg, lambda: conflict_dataset(model, cfg, cfg.batch_size))

    def dataset_hash(self, model: LoadedModel, cfg: ConflictHeadsConfig) -> str | None:
        return facts_hash(cfg.facts)

    def example_tokens(self, model: LoadedModel, cfg: ConflictHeadsConfig) -> torch.Tensor | None:
        return example_tokens(model, cfg)

    def units(self, model: LoadedModel, cfg: ConflictHeadsConfig) -> list[Unit]:
        return [Unit("format", i, label=fmt) for i, fmt in enumerate(cfg.formats)]

    # A format's unit splits by validation items: each part path-patches its share of the items;
    # the first also scores the answer rates and the total effects. The driver averages them.
    def max_parts(self, model: LoadedModel, cfg: ConflictHeadsConfig, unit: Unit) -> int:
        return len(self.dataset(model, cfg).split("validation"))

    def run_part(self, model: LoadedModel, cfg: ConflictHeadsConfig, part: Part) -> dict[str, Any]:
        fmt = cfg.formats[int(part.unit.index or 0)]
        ds = self.dataset(model, cfg)
        val = ds.split("validation")
        share = np.array_split(np.arange(len(val)), part.count)[part.index]
        out: dict[str, Any] = {"effects": head_effects(model, [val[j] for j in share], fmt, cfg.batch_size)}
        if part.index == 0:
            metrics: list[tuple[str, float, float | None, float | None, int | None]] = []
            for split in ("validation", "test"):
                r = rate_intervals(score_items(model, ds.split(split), fmt, batch_size=cfg.batch_size))
                metrics += [(f"{fmt}.{split}.{k}", iv.value, _bound(iv.lo), _bound(iv.hi), iv.n) for k, iv in r.items()]
            out["metrics"] = metrics
            if cfg.total_effect:
                out["total"] = total_effects(model, val[: cfg.total_items], fmt)
        return out

    def join_parts(self, model: LoadedModel, cfg: ConflictHeadsConfig, unit: Unit, parts: Sequence[Any]) -> UnitResult:
        fmt, first = cfg.formats[int(unit.index or 0)], parts[0]
        n_val = len(self.dataset(model, cfg).split("validation"))
        effects = pd.concat([p["effects"] for p in parts], ignore_index=True)
        per_item = effects.groupby("item").size()
        n_heads = model.info.n_layers * model.info.n_heads
        if len(per_item) != n_val or bool((per_item != n_heads).any()):
            raise ValueError(f"the parts of {fmt} cover {len(per_item)} of its {n_val} validation items, "
                             "some twice or none")
        scores = mean_by_head(effects)
        metrics = list(first["metrics"])
        if cfg.total_effect:
            scores = scores.merge(mean_by_head(first["total"]), on=["layer", "head"])
            metrics.append((f"{fmt}.n_total_effect_items", float(min(n_val, cfg.total_items)), None, None, None))
        metrics.append((f"{fmt}.n_patch_items", float(n_val), None, None, n_val))
        return UnitResult(
            tables={"head_scores": prefixed_head_scores(scores, fmt), "metrics": tables.metric_rows(metrics)}
        )

    def finalize(
        self, model: LoadedModel, cfg: ConflictHeadsConfig, results: Mapping[str, pd.DataFrame]
    ) -> Summary:
        met = results["metrics"]
        metrics: dict[str, Any] = dict(
            zip(met["name"].astype(str).tolist(), met["value"].astype(float).tolist(), strict=True)
        )
        formats = {u.key: str(u.label) for u in self.units(model, cfg)}
        hs, pooled = _pooled(results["head_scores"], formats, {f: metrics[f"{f}.n_patch_items"] for f in cfg.formats})
        rank_col = _rank_column(cfg)
        wide = _ranking(pooled, rank_col)
        metrics.update(_top_head_metrics(wide, rank_col, cfg.n_top, model.info.n_layers))
        metrics.update(_agreement_metrics(hs, wide, rank_col, cfg))
        ds = self.dataset(model, cfg)
        split = ds.split_record()
        split_metrics, warnings = _dataset_metrics(ds, cfg.seed, split)
        metrics.update(split_metrics)
        return Summary(heads=_head_rows(wide),
            metrics=metrics,
            intervals=_rate_intervals(met, cfg.formats),
            warnings=warnings,
            tables={
                "head_scores": _final_head_scores(hs, pooled, wide),
                "metrics": tables.metrics(metrics),
                "artifacts": self._artifacts(cfg, ds, split),
            },
        )

    def _artifacts(self, cfg: ConflictHeadsConfig, ds: ConflictDataset, split: Mapping[str, Any]) -> pd.DataFrame:
        """The split, what was patched and how (the run's settings artifact holds the
        parameters), and every item with its split."""
        patching = {
            "variant": self.variant(cfg),
            "frozen": FROZEN,
            "final_norm": cfg.norm,
            "metric": "logit(memory) - logit(context) at the final position, first answer tokens",
            "sign": "path_delta = metric(patched) - metric(conflict); memory_score = -path_delta",
            "ranking_split": "validation",
            "formats": list(cfg.formats),
        }
        items = ([dict(i.to_dict(), split="validation") for i in ds.validation]
                 + [dict(i.to_dict(), split="test") for i in ds.test])
        return pd.concat(
            [tables.artifact("split", split), tables.artifact("patching", patching), tables.artifact("items", items)],
            ignore_index=True,
        )
