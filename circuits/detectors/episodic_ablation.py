"""Ablation of the top-k heads by a score against random heads (Ji-An et al. 2024; McGrath et al. 2023)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from circuits.data.texts import TEXT_SAMPLE, text_chunks
from circuits.detectors.copying import copying_scores
from circuits.detectors.induction import copy_losses
from circuits.detectors.lag_crp import _col, _finite, lag_crp_unit
from circuits.methods import cmr_model
from circuits.methods.heads import head_label, random_heads
from circuits.methods.lists import repeated_lists
from interp.errors import UserError
from interp.model.interventions import Intervention, ablate_heads
from interp.model.loaded import LoadedModel
from interp.model.tokens import repeated_random_tokens
from interp.runs import tables
from interp.runs.config import MAX_DRAWS, SEED_MAX, DetectorConfig, param
from interp.runs.registry import Detector, Summary, UnitResult, register
from interp.runs.units import Unit
from interp.stats import Interval, against_random
from interp.stats.means import paired_p, t_interval

if TYPE_CHECKING:
    import plotly.graph_objects as go


def per_token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """nll[:, i] = loss of predicting token i+1 (TransformerLens's per-token convention)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0]


def ranked_by_score(model: LoadedModel, score: str, seed: int) -> list[tuple[int, int]]:
    """All heads, best first by ``score``: copying score, attention lag-CRP at lag +1
    (induction) or CMR distance, the last two on 20 repeated lists of 50 tokens."""
    if score == "copying":
        s = copying_scores(model).cpu().numpy()
        order = np.argsort(-s.reshape(-1), kind="stable")
    else:
        prompts = repeated_lists(model, 20, 50, seed)
        res = lag_crp_unit(model, prompts, 8)
        crp = res["sums"] / np.maximum(res["counts"], 1)
        lags = np.arange(-8, 9)
        if score == "induction":
            order = np.argsort(-crp[..., int(np.flatnonzero(lags == 1)[0])].reshape(-1), kind="stable")
        else:
            fit = cmr_model.fit_cmr(crp.reshape(-1, len(lags)), lags, cmr_model.cmr_grid(), cmr_model.FIT_LAG)
            dist = np.nan_to_num(fit.distance, nan=np.inf)
            order = np.argsort(dist, kind="stable")
    n_h = model.info.n_heads
    return [(int(i) // n_h, int(i) % n_h) for i in order]


def mean_z(model: LoadedModel, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's z averaged over the batch and the positions (mean ablation's reference)."""
    with torch.no_grad():
        out = model.run(tokens, cache=["z.*"])
    return {name: z.mean(dim=(0, 1), keepdim=True) for name, z in out.cache.items()}


def ablation_effects(
    curves: pd.DataFrame, units: Sequence[Unit]
) -> tuple[dict[str, Any], list[tables.MetricRow]]:
    """Per measure: the clean value and the change under each ablation (top-k, the mean of the
    random draws, each single and cumulative set) against clean, with t intervals, the paired
    p-value of top-k against random, and where the top-k change falls among the draws' changes
    (percentile and empirical p, Phipson & Smyth 2010); as summary metrics and ``metrics`` rows."""
    c_unit, c_curve, c_x, c_y = (_col(curves, c) for c in ("unit", "curve", "x", "y"))
    draws = [u.key for u in units if u.group == "random"]

    def values(unit: str, metric: str) -> np.ndarray:
        sel = (c_unit == unit) & (c_curve == metric)
        return c_y[sel][np.argsort(c_x[sel].astype(float))].astype(float)

    metrics: dict[str, Any] = {}
    # The changes are per-text differences from clean on the same texts: paired t intervals.
    rows: list[tables.MetricRow] = []
    for metric in ("icl", "icl_window", "second_copy_loss"):
        clean = values("clean", metric)
        top = values("top", metric)
        rand = np.mean([values(u, metric) for u in draws], axis=0)
        metrics[f"{metric}_clean"] = float(clean.mean())
        for name, arr in (("top", top), ("random", rand)):
            m, lo, hi = t_interval(arr - clean)
            metrics[f"{metric}_delta_{name}"] = m
            metrics[f"{metric}_delta_{name}_ci"] = [lo, hi]
            rows.append((f"{metric}_delta_{name}", m, lo, hi, len(arr), "paired-t"))
        m, lo, hi = t_interval(top - rand)
        metrics[f"{metric}_top_minus_random"] = m
        metrics[f"{metric}_top_minus_random_ci"] = [lo, hi]
        metrics[f"{metric}_paired_p"] = paired_p(top, rand)
        rows.append((f"{metric}_top_minus_random", m, lo, hi, len(top), "paired-t"))
        rows.append((f"{metric}_paired_p", metrics[f"{metric}_paired_p"], None, None, len(top)))
        per_draw = [float((values(u, metric) - clean).mean()) for u in draws]
        metrics[f"{metric}_delta_random_per_draw"] = per_draw
        # The top set among the draws: ablating heads that carry in-context copying raises each
        # measure (the ICL score towards 0, the second-copy loss up), so "higher" is the effect.
        control = against_random(float((top - clean).mean()), per_draw, "higher")
        for name, v in (("percentile", control.percentile), ("p", control.p_value)):
            metrics[f"{metric}_top_vs_random_{name}"] = v
            rows.append((f"{metric}_top_vs_random_{name}", v, None, None, len(per_draw)))
        for u in units:
            if u.group in ("single", "cum"):
                mm, lo2, hi2 = t_interval(values(u.key, metric) - clean)
                metrics[f"{metric}_delta_{u.key}"] = mm
                rows.append((f"{metric}_delta_{u.key}", mm, lo2, hi2, len(clean), "paired-t"))
    return metrics, rows


def _unit_heads(artifacts: pd.DataFrame, unit: str) -> list[tuple[int, ...]]:
    """The heads a unit ablated (its ``heads`` artifact); none when it has no such artifact."""
    doc = tables.read_artifact(artifacts.loc[_col(artifacts, "unit") == unit], "heads")
    return [tuple(h) for h in doc or []]


@dataclass(frozen=True)
class EpisodicAblationConfig(DetectorConfig):
    """Parameters of ``episodic-ablation`` (each field's help says what it is)."""

    score: Literal["cmr", "induction", "copying"] = param(
        "cmr", "rank heads by: CMR distance, prefix-matching or copying"
    )
    k: int = param(0, "heads ablated together (0: 10% of all heads, as Ji-An et al.)", low=0)
    n_draws: int = param(20, "random sets of k heads drawn outside the top set", low=1, high=MAX_DRAWS)
    method: Literal["zero", "mean"] = param("zero", "ablation of the heads' value vectors (z)")
    n_texts: int = param(8, "512-token windows of the bundled text (0: all)", low=0)
    # 0 < early < late < seq_len - 1 (check); the lows are what that implies alone.
    seq_len: int = param(512, "tokens per text window, prompt prefix included", low=4)
    late: int = param(500, "ICL score = loss at this token index ...", low=2)
    early: int = param(50, "... minus loss at this one", low=1)
    window: int = param(
        25, "also report a windowed ICL score: mean loss over `window` tokens ending at each index", low=1
    )
    n_single: int = param(3, "single-head ablations of the top heads (at most k)", low=0)
    cum_sizes: tuple[int, ...] = param((1, 3), "cumulative ablations of the top-n heads (k is always included)", low=1)
    rep_len: int = param(50, "length R of the repeated random tokens for the second-copy loss", low=2)
    rep_prompts: int = param(8, "repeated-token prompts for the second-copy loss", low=1)
    batch_size: int = param(4, "texts per forward pass", low=1)
    seed: int = param(0, "seed of the random draws and repeated tokens", low=0, high=SEED_MAX)

    def check(self) -> None:
        super().check()
        early, late, seq_len = self.early, self.late, self.seq_len
        if not 0 < early < late < seq_len - 1:
            raise UserError(f"need 0 < early < late < seq_len - 1, got early={early}, late={late}, seq_len={seq_len}")
        if self.window > early + 1:
            raise UserError(f"window must be in 1..early+1 ({early + 1}), got {self.window}")
        if self.k and self.n_single > self.k:
            raise UserError(f"n_single must be in 0..k ({self.k}), got {self.n_single}")


@register
class EpisodicAblationDetector(Detector[EpisodicAblationConfig]):
    name = "episodic-ablation"
    description = "Ablate the top-k heads by a score vs k random heads: ICL score and second-copy loss with CIs"
    output = "intervention"
    head_columns: ClassVar[dict[str, str]] = {"single_delta_icl": "alone: icl", "single_delta_second_copy_loss": "alone: 2nd loss"}
    curve_axes: ClassVar[dict[str, tuple[str, str]]] = {
        "icl": ("text window (index)", "ICL score: loss at token late - loss at token early (nats)"),
        "icl_window": ("text window (index)", "windowed ICL score: mean loss difference (nats)"),
        "second_copy_loss": ("repeated-token prompt (index)", "loss on the second copy (nats per token)"),
    }
    Config = EpisodicAblationConfig

    def variant(self, cfg: EpisodicAblationConfig) -> str:
        return f"{cfg.method}-ablation/top-by-{cfg.score}"

    def method_text(self, cfg: EpisodicAblationConfig) -> str:
        return (f"{cfg.method} ablation of the value vectors (z) of the top-k heads by {cfg.score} score against "
                f"{cfg.n_draws} draws of k random heads outside the top set, single-head and cumulative "
                "ablations (McGrath et al. 2023): change of the ICL score (loss at token late minus loss at token "
                "early, Olsson et al. 2022) on text windows and of the second-copy loss on repeated tokens, "
                "t intervals, a paired t-test and the top set's percentile and empirical p among the draws")

    def dataset_hash(self, model: LoadedModel, cfg: EpisodicAblationConfig) -> str | None:
        return hashlib.sha256(TEXT_SAMPLE.read_bytes()).hexdigest()

    def _k(self, model: LoadedModel, cfg: EpisodicAblationConfig) -> int:
        return cfg.k or max(1, round(0.1 * model.info.n_total_heads))

    def units(self, model: LoadedModel, cfg: EpisodicAblationConfig) -> list[Unit]:
        k = self._k(model, cfg)
        total = model.info.n_total_heads
        if 2 * k > total:
            raise UserError(f"k must be in 1..{total // 2} so that k random heads fit outside the top k")
        if cfg.n_single > k:
            raise UserError(f"n_single must be in 0..k ({k})")
        model.check_length(cfg.seq_len)
        model.check_length(2 * cfg.rep_len + len(model.prefix))
        text_chunks(model, cfg.n_texts, cfg.seq_len)
        sizes = [s for s in sorted(set(cfg.cum_sizes)) if s < k]
        units = [Unit("clean"), Unit("top"), *(Unit("random", d) for d in range(cfg.n_draws))]
        units += [Unit("single", i) for i in range(cfg.n_single)]
        units += [Unit("cum", s) for s in sizes]
        return units

    def example_tokens(self, model: LoadedModel, cfg: EpisodicAblationConfig) -> torch.Tensor:
        return text_chunks(model, cfg.n_texts, cfg.seq_len)

    def ranking(self, model: LoadedModel, cfg: EpisodicAblationConfig) -> list[tuple[int, int]]:
        """All heads, best first by the chosen score (computed once per run, deterministically)."""
        return self.memo("ranking", model, cfg, lambda: ranked_by_score(model, cfg.score, cfg.seed))

    def heads_for(self, model: LoadedModel, cfg: EpisodicAblationConfig, unit: Unit) -> list[tuple[int, int]]:
        ranked = self.ranking(model, cfg)
        k = self._k(model, cfg)
        if unit.group == "clean":
            return []
        if unit.group == "top":
            return ranked[:k]
        i = int(unit.index or 0)
        if unit.group == "random":
            # Draw i has its own generator, so a resumed run redraws exactly the missing draws.
            return random_heads(ranked, ranked[:k], k, np.random.default_rng([cfg.seed, i]))
        if unit.group == "single":
            return [ranked[i]]
        return ranked[:i]

    def _sources(self, model: LoadedModel, cfg: EpisodicAblationConfig, tokens: torch.Tensor) -> dict[str, Any]:
        if cfg.method != "mean":
            return {}
        # Mean ablation replaces z by its mean over the clean text windows (batch and positions).
        return {"ref": self.memo("mean-z", model, cfg, lambda: mean_z(model, tokens))}

    def _interventions(self, heads: list[tuple[int, int]], cfg: EpisodicAblationConfig) -> list[Intervention]:
        if not heads:
            return []
        return ablate_heads(heads, cfg.method, source="ref" if cfg.method == "mean" else None)

    def run_unit(self, model: LoadedModel, cfg: EpisodicAblationConfig, unit: Unit) -> UnitResult:
        heads = self.heads_for(model, cfg, unit)
        texts = text_chunks(model, cfg.n_texts, cfg.seq_len)
        sources = self._sources(model, cfg, texts)
        ivs = self._interventions(heads, cfg)
        late, early, w = cfg.late, cfg.early, cfg.window
        icl, icl_w = [], []
        for start in range(0, texts.shape[0], cfg.batch_size):
            batch = texts[start : start + cfg.batch_size]
            with torch.no_grad():
                logits = model.run(batch, interventions=ivs, sources=sources).logits
            nll = per_token_nll(logits, batch)
            icl += (nll[:, late] - nll[:, early]).tolist()
            icl_w += (nll[:, late - w + 1 : late + 1].mean(1) - nll[:, early - w + 1 : early + 1].mean(1)).tolist()
        rep = repeated_random_tokens(model, cfg.rep_prompts, cfg.rep_len, cfg.seed + 7919)
        with torch.no_grad():
            logits = model.run(rep, interventions=ivs, sources=sources).logits
        second = [copy_losses(logits[i : i + 1], rep[i : i + 1], cfg.rep_len, len(model.prefix))[1] for i in range(rep.shape[0])]
        # Curves over texts (x: the text's index), of no single head.
        rows = [("icl", None, None, float(i), v) for i, v in enumerate(icl)]
        rows += [("icl_window", None, None, float(i), v) for i, v in enumerate(icl_w)]
        rows += [("second_copy_loss", None, None, float(i), v) for i, v in enumerate(second)]
        return UnitResult(
            tables={"curves": tables.curves(rows), "artifacts": tables.artifact("heads", [list(h) for h in heads])}
        )

    def finalize(
        self, model: LoadedModel, cfg: EpisodicAblationConfig, results: Mapping[str, pd.DataFrame]
    ) -> Summary:
        k = self._k(model, cfg)
        units = self.units(model, cfg)
        draws = [u.key for u in units if u.group == "random"]
        metrics: dict[str, Any] = {"k": k, "n_draws": len(draws), "method": cfg.method, "score": cfg.score}
        effects, rows = ablation_effects(results["curves"], units)
        metrics.update(effects)
        ranked = self.ranking(model, cfg)[:k]
        heads = [
            {
                "layer": layer,
                "head": head,
                "rank": i,
                "score": float(-i),
                "single_delta_icl": metrics.get(f"icl_delta_single-{i}"),
                "single_delta_second_copy_loss": metrics.get(f"second_copy_loss_delta_single-{i}"),
            }
            for i, (layer, head) in enumerate(ranked)
        ]
        metrics["top_heads"] = [head_label(layer, head) for layer, head in ranked]
        metrics["random_heads"] = {
            u: [head_label(a, b) for a, b in _unit_heads(results["artifacts"], u)] for u in draws
        }
        # Every change is against clean on the same prompts (or top against random): paired t.
        intervals = {r[0]: Interval(r[1], r[2], r[3], int(r[4]), r[5], 0.95) for r in rows
                     if len(r) > 5 and r[2] is not None and r[3] is not None and r[4] is not None and r[5] is not None}
        return Summary(heads=heads, metrics=_finite(metrics), intervals=intervals,
                       tables={"metrics": tables.metric_rows(rows)})


def fig_ablation(metrics: Mapping[str, Any]) -> go.Figure:
    """Change of ICL score and second-copy loss: top-k vs random-k (95% CIs)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = ("icl", "icl_window", "second_copy_loss")
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[f"delta {n}" for n in names])
    for i, metric in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for group in ("top", "random"):
            m = metrics[f"{metric}_delta_{group}"]
            ci = metrics[f"{metric}_delta_{group}_ci"]
            xs.append(f"{group}-{metrics['k']}")
            ys.append(m)
            lo.append(m - ci[0])
            hi.append(ci[1] - m)
        fig.add_trace(
            go.Bar(x=xs, y=ys, error_y={"type": "data", "array": hi, "arrayminus": lo}, showlegend=False),
            row=1, col=i + 1,
        )
        fig.update_xaxes(title_text="heads ablated", row=1, col=i + 1)
        fig.update_yaxes(title_text=f"change of {metric} vs clean (nats)", row=1, col=i + 1)
    fig.update_layout(title=f"Ablating top-{metrics['k']} ({metrics['score']}) vs random heads ({metrics['method']})")
    return fig
