"""Masking the top retrieval heads against random heads on needle retrieval (Wu et al. 2024)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from circuits.detectors.retrieval import (
    CORRECTNESS,
    NeedleGridConfig,
    RetrievalConfig,
    _artifacts,
    _mean,
    _NeedleDetector,
    accuracy_curves,
    is_correct,
    needle_decode,
    ranked_by_retrieval,
    response_text,
)
from circuits.methods.heads import Head, all_heads, parse_heads, random_heads
from interp.errors import UserError
from interp.model.interventions import Intervention, ablate_heads
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.config import MAX_DRAWS, param
from interp.runs.registry import Summary, UnitResult, register
from interp.runs.units import Unit
from interp.stats import Interval, against_random, interval, paired_interval

if TYPE_CHECKING:
    import plotly.graph_objects as go


@dataclass(frozen=True)
class RetrievalMaskingConfig(NeedleGridConfig):
    """Parameters of the masking experiment: which heads, how masked, the random controls."""

    heads: tuple[str, ...] = param(
        (), "ranking as LAYER.HEAD,... best first; empty: compute it (faithful retrieval scan)"
    )
    top_k: int = param(10, "K: how many top retrieval heads to mask", low=1)
    method: Literal["uniform", "zero"] = param(
        "uniform", "uniform: zero the query (the reference's mask); zero: zero the head output"
    )
    n_random: int = param(20, "draws of K random heads", low=1, high=MAX_DRAWS)
    exclude_top: int = param(-1, "random heads are drawn outside the top N of the ranking "
                             "(-1: max(K, 10% of heads); the paper draws outside its top 100)", low=-1)
    ranking_mode: Literal["faithful", "fast"] = param("faithful", "score used to rank heads when 'heads' is empty")

    def check(self) -> None:
        super().check()
        if self.heads:
            ranked = parse_heads(",".join(self.heads))
            if len(ranked) < self.top_k:
                raise UserError(f"'heads' lists {len(ranked)} heads, fewer than top_k={self.top_k}")

    def ranking_config(self) -> RetrievalConfig:
        """The retrieval scan that ranks the heads when ``heads`` is empty: this grid, scored in
        ``ranking_mode``, every correctly answered sample counted."""
        grid = {f.name: getattr(self, f.name) for f in dataclasses.fields(NeedleGridConfig)}
        # The ranking is computed on other haystack windows than the ones it is tested on.
        return RetrievalConfig(**{**grid, "seed": self.seed + 1, "mode": self.ranking_mode, "min_counted": 1})


@register
class RetrievalMaskingDetector(_NeedleDetector[RetrievalMaskingConfig]):
    name = "retrieval-masking"
    description = "Needle accuracy with the top-K retrieval heads masked vs K random heads (Wu et al. 2024)"
    output = "intervention"
    Config = RetrievalMaskingConfig

    def variant(self, cfg: RetrievalMaskingConfig) -> str:
        return f"{cfg.method}-mask"

    def method_text(self, cfg: RetrievalMaskingConfig) -> str:
        how = ("the query zeroed (uniform attention, as Wu et al. 2024 mask a head)" if cfg.method == "uniform"
               else "the head's output zeroed")
        source = "given" if cfg.heads else f"a {cfg.ranking_mode} retrieval scan on the seed+1 haystack windows"
        return (f"greedy needle answers with the top {cfg.top_k} retrieval heads masked ({how}) against "
                f"{cfg.n_random} draws of {cfg.top_k} random heads outside the top of the ranking ({source}); "
                f"accuracy is {CORRECTNESS}")

    def _n_exclude(self, model: LoadedModel, cfg: RetrievalMaskingConfig) -> int:
        """How many top heads of the ranking the random draws avoid (at least K)."""
        k, n_excl = cfg.top_k, cfg.exclude_top
        if n_excl < 0:
            n_excl = max(k, int(np.ceil(0.1 * model.info.n_total_heads)))
        return max(n_excl, k)

    def units(self, model: LoadedModel, cfg: RetrievalMaskingConfig) -> list[Unit]:
        total = model.info.n_total_heads
        # The config checked the list against top_k; the model checks each index.
        n_ranked = len(parse_heads(",".join(cfg.heads), model)) if cfg.heads else total
        if cfg.top_k >= total:
            raise UserError(f"top_k={cfg.top_k} leaves no heads to draw at random")
        pool = total - min(self._n_exclude(model, cfg), n_ranked)
        if pool < cfg.top_k:
            raise UserError(
                f"only {pool} of the model's {total} heads lie outside the top {total - pool} of the ranking "
                f"(exclude_top); cannot draw top_k={cfg.top_k} random heads"
            )
        units = self.sample_units(model, cfg)
        return units if cfg.heads else [Unit("ranking"), *units]

    def _ranked(self, model: LoadedModel, cfg: RetrievalMaskingConfig) -> tuple[list[Head], Summary]:
        """The computed ranking and the summary of the retrieval scan behind it."""
        return self.memo("ranked", model, cfg, lambda: ranked_by_retrieval(model, cfg.ranking_config()))

    def ranking(self, model: LoadedModel, cfg: RetrievalMaskingConfig) -> list[Head]:
        """The heads best first: ``heads`` as given, else the ranking unit's (or a stored one)."""
        if cfg.heads:
            return parse_heads(",".join(cfg.heads), model)
        return self.memo("ranking", model, cfg, lambda: self._ranked(model, cfg)[0])

    def head_sets(self, model: LoadedModel, cfg: RetrievalMaskingConfig) -> dict[str, list[Head]]:
        ranked = self.ranking(model, cfg)
        k = cfg.top_k
        n_excl = self._n_exclude(model, cfg)
        sets = {"none": [], f"top{k}": ranked[:k]}
        # The draws follow each other from one generator seeded with the run's seed.
        rng = random.Random(cfg.seed)
        for i in range(cfg.n_random):
            sets[f"random{k}-draw{i}"] = random_heads(all_heads(model), ranked[:n_excl], k, rng)
        return sets

    def _ranking_unit(self, model: LoadedModel, cfg: RetrievalMaskingConfig) -> UnitResult:
        ranked, summary = self._ranked(model, cfg)
        self.memo("ranking", model, cfg, lambda: ranked)
        scores = summary.tables["head_scores"].assign(metric="ranking_retrieval")
        return UnitResult(tables={
            "head_scores": scores,
            "metrics": tables.metrics({f"ranking_{k}": v for k, v in summary.metrics.items()},
                                      n=int(summary.metrics["n_samples"])),
            "artifacts": tables.artifact("ranking", {"variant": summary.variant, "warnings": summary.warnings,
                                                     "heads": [list(h) for h in ranked]}),
        })

    def run_unit(self, model: LoadedModel, cfg: RetrievalMaskingConfig, unit: Unit) -> UnitResult:
        if unit.group == "ranking":
            return self._ranking_unit(model, cfg)
        sample = self.sample(model, cfg, unit)
        sets = self.head_sets(model, cfg)
        names = list(sets)
        ivs: list[Intervention] = []
        for row, name in enumerate(names):
            if sets[name]:
                ivs.extend(ablate_heads(sets[name], cfg.method, batch=(row,)))
        ids = torch.tensor([sample.input_ids] * len(names), dtype=torch.long)
        generated, _ = needle_decode(model, ids, cfg.max_new_tokens, interventions=ivs)
        info: dict[str, Any] = {**sample.describe()}
        correct = {}
        for name, gen in zip(names, generated, strict=True):
            resp = response_text(model, gen)
            ok = is_correct(sample.needle.answer, resp)
            info[f"response:{name}"] = resp
            info[f"correct:{name}"] = bool(ok)
            correct[f"correct:{name}"] = float(ok)
        return UnitResult(tables={"metrics": tables.metrics(correct, n=1),
                                  "artifacts": tables.artifact("masked_sample", info)})

    def finalize(
        self, model: LoadedModel, cfg: RetrievalMaskingConfig, results: Mapping[str, pd.DataFrame]
    ) -> Summary:
        samples = pd.DataFrame(_artifacts(results, "masked_sample"))
        ranking = _artifacts(results, "ranking")
        if ranking and not cfg.heads:
            # The stored ranking, so a resumed run never recomputes it here.
            stored = [(int(la), int(h)) for la, h in ranking[0]["heads"]]
            self.memo("ranking", model, cfg, lambda: stored)
        sets = self.head_sets(model, cfg)
        k = cfg.top_k
        metrics: dict[str, Any] = {"n_samples": len(samples), "top_k": k, "method": cfg.method,
                                   "n_random": cfg.n_random, "correctness": CORRECTNESS,
                                   "ranking_source": "param" if cfg.heads else f"computed ({cfg.ranking_mode}, seed+1)"}
        rand_cols = [f"correct:{n}" for n in sets if n.startswith("random")]
        samples["correct:random-mean"] = samples[rand_cols].mean(axis=1)
        draws = [_mean(samples[c]) for c in rand_cols]
        metrics.update(masking_accuracies(samples, list(sets), draws, k))
        intervals, control = masking_uncertainty(samples, draws, k)
        metrics.update(control)
        # Each sample's accuracy over the random draws is a fraction: its mean gets a t interval.
        curves = [accuracy_curves(samples, f"correct:{name}", name, "t" if name == "random-mean" else "wilson")
                  for name in ["none", f"top{k}", "random-mean"]]
        warnings: list[str] = []
        if metrics["accuracy:none"] == 0:
            warnings.append(
                f"the unmasked model answered none of the {len(samples)} samples ({CORRECTNESS}): "
                "masking cannot show a drop"
            )
        if ranking:
            warnings.extend(f"ranking: {w}" for w in ranking[0].get("warnings", []))
        out = {
            "metrics": tables.metrics(metrics, n=len(samples)),
            "curves": pd.concat(curves, ignore_index=True),
            "artifacts": tables.artifact("head_sets", {n: [list(h) for h in hs] for n, hs in sets.items()}),
        }
        return Summary(heads=None, metrics=metrics, intervals=intervals, warnings=warnings, tables=out)


def masking_uncertainty(samples: pd.DataFrame, draws: Sequence[float],
                        k: int) -> tuple[dict[str, Interval], dict[str, Any]]:
    """The unmasked and top-k accuracies with their Wilson intervals, the drop between them on
    the same samples with its paired interval (Newcombe), and where the top-k accuracy falls
    among the random draws' accuracies (its percentile and the empirical p-value that masking
    random heads hurts as much, Phipson & Smyth 2010), with each draw's accuracy in draw order
    (a list: the summary's, not a stored metric)."""
    none, top = samples["correct:none"].to_numpy(float), samples[f"correct:top{k}"].to_numpy(float)
    intervals = {"accuracy:none": interval(none, method="wilson"),
                 f"accuracy:top{k}": interval(top, method="wilson"),
                 "drop:top": paired_interval(none, top, method="newcombe")}
    control = against_random(_mean(top), draws, "lower")
    return intervals, {"top_vs_random:percentile": control.percentile, "top_vs_random:p": control.p_value,
                       "random_accuracies": list(draws)}


def masking_accuracies(samples: pd.DataFrame, conditions: Sequence[str], draws: Sequence[float],
                       k: int) -> dict[str, float]:
    """Needle accuracy of each condition (head set), of the random draws (mean of the per-sample
    mean ``correct:random-mean``; the worst and best of ``draws``, each draw's accuracy), and the
    drops from the unmasked model."""
    acc = {f"accuracy:{name}": _mean(samples[f"correct:{name}"]) for name in conditions}
    acc["accuracy:random-mean"] = _mean(samples["correct:random-mean"])
    acc["accuracy:random-min"] = min(draws)
    acc["accuracy:random-max"] = max(draws)
    base = acc["accuracy:none"]
    acc["drop:top"] = base - acc[f"accuracy:top{k}"]
    acc["drop:random-mean"] = base - acc["accuracy:random-mean"]
    return acc


def accuracy_grid(samples: pd.DataFrame, column: str = "correct") -> pd.DataFrame:
    """Depth x length table of the mean of ``column`` (needle accuracy)."""
    t = samples.assign(_v=samples[column].astype(float))
    return t.pivot_table(index="depth", columns="length", values="_v", aggfunc="mean")


def accuracy_heatmaps(samples: pd.DataFrame, columns: Mapping[str, str]) -> go.Figure:
    """One depth x length accuracy heatmap per condition (title -> column), side by side."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(columns), subplot_titles=list(columns), shared_yaxes=True)
    for i, (title, col) in enumerate(columns.items(), start=1):
        grid = accuracy_grid(samples, col)
        fig.add_trace(go.Heatmap(z=grid.values, x=[str(c) for c in grid.columns], y=[f"{d:.2f}" for d in grid.index],
                                 zmin=0, zmax=1, colorscale="RdYlGn", showscale=i == len(columns), name=title,
                                 colorbar={"title": "accuracy (fraction of samples)"},
                                 hovertemplate=f"{title}<br>length %{{x}}, depth %{{y}}: %{{z:.2f}}<extra></extra>"),
                      row=1, col=i)
        fig.update_xaxes(title_text="context length (tokens)", row=1, col=i)
    fig.update_yaxes(title_text="needle depth (0 = start, 1 = end of the context)", row=1, col=1)
    fig.update_layout(title="Needle accuracy by context length and depth")
    return fig
