"""Factual-recall sites: causal tracing (Meng et al. 2022, ROME) and attention knockout (Geva et al. 2023).

Causal tracing (Meng et al. 2022), faithful to ROME's reference code:

- The batch is 1 clean row + N corrupted rows (N = ``samples``, 10). Corruption adds Gaussian
  noise to the subject tokens' embeddings only (site ``embed``), std = ``noise_factor`` (3) x the
  std of the embeddings of the dataset's subjects (each subject tokenised alone, all values
  pooled, as ROME's ``collect_embedding_std``), or an absolute ``noise`` when given. The noise is
  ``AddNoise``'s seeded draw, so every restoration sees the same N noise samples.
- A cell (token t, layer L) restores from the clean run, in all N corrupted rows: the residual
  state after block L (``resid_post.L``, ROME's hidden state), or the MLP outputs (``mlp_out``)
  or attention outputs (``attn_out``) of the layer window [L - w//2, L + w - w//2) (w = 10) at
  token t. Score = mean p(answer) over the corrupted rows at the last position.
  Indirect effect = restored - corrupted; total effect = clean - corrupted.
- Cells run through the patching engine (``interp.patching.execution.run_sweep``): the noise is the sweep's
  base intervention, each cell gets its own N rows, cells are stacked in the batch dimension and
  chunked by a memory budget. A restoration at (t, L) can change nothing below its lowest
  restored layer or before position t, so the engine starts it there, from the corrupted run's
  residual and KV cache (``reuse``; checked against full passes in the tests). Cells at tokens
  before the first subject token are not run: with causal attention their clean and corrupted
  activations are identical, so restoring them gives the corrupted score exactly, which is what
  is stored for them.
- Multi-token answers are traced on the probability of their FIRST token (as ROME).

Averages over known facts use ROME's buckets: first / middle / last subject token, first
subsequent token, further tokens, last token (tokens before the subject belong to no bucket; a
one-token subject counts as both first and last subject token).

Attention knockout (Geva et al. 2023): from the last position, the attention edges to a set of
source positions (``subject``; ``non_subject`` = every other position except the last, the prompt prefix
included; ``last`` = itself) are blocked (score -inf before the softmax) in all heads of a window
of layers centred at L, same window convention as above (default 9). Metric = relative change
of p(answer first token) = (p_knocked - p_clean) / p_clean; averaged over facts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from circuits.detectors.facts_detector import KNOWN_METRICS, FactsConfig, _FactsDetector, _per_unit
from circuits.methods.tracing import (
    BUCKETS,
    RESTORABLE,
    PromptTrace,
    Restored,
    average_buckets,
    heatmap_figure,
    joined_trace,
    prepare,
    prepare_fact,
    subject_embedding_std,
    trace_fact,
    trace_part,
)
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.config import SEED_MAX, param
from interp.runs.registry import Summary, UnitResult, get_detector, register
from interp.runs.runner import run_in_memory
from interp.runs.units import Part, Unit
from interp.stats import Interval, bootstrap_interval, mean_interval

if TYPE_CHECKING:
    pass


# --------------------------------------------------------------------------- inputs


# --------------------------------------------------------------------------- causal tracing


# --------------------------------------------------------------------------- buckets


# --------------------------------------------------------------------------- knockout


# --------------------------------------------------------------------------- detectors


@dataclass(frozen=True)
class CausalTraceConfig(FactsConfig):
    """Parameters of causal tracing (Meng et al. 2022, ROME; each field's help says what it is)."""

    # One fact is ~T x n_layers x 3 cells x N rows (about 9000 rows of ~10 tokens on
    # smollm2-135m), minutes on 2 CPU cores: the default keeps a first look short.
    limit: int = param(2, "how many known facts of the file to trace (in file order)", low=1)
    samples: int = param(10, "N corrupted copies per restoration (ROME: 10)", low=1)
    noise_factor: float = param(3.0, "noise std = this x the std of subject embeddings (ROME: 3)",
                                low=0, low_open=True)
    noise: float = param(0.0, "absolute noise std; overrides noise_factor when > 0", low=0)
    window: int = param(10, "layer window of the MLP and attention restorations (ROME: 10)", low=1)
    kinds: tuple[Restored, ...] = param(RESTORABLE, "what to restore: comma-separated subset of state, mlp, attn")
    seed: int = param(1, "seed of the noise draw", low=0, high=SEED_MAX)
    memory_mb: float = param(512.0, "memory budget of one forward pass (chunks the stacked restorations)",
                             low=0, low_open=True)

    def check(self) -> None:
        super().check()
        if not self.kinds:
            raise UserError(f"kinds must be a comma-separated subset of {', '.join(RESTORABLE)}, got none")


def _fact_effects(
    per_unit: Mapping[str, Mapping[str, float]], token_layer: pd.DataFrame, kinds: Sequence[str], n_layers: int
) -> tuple[dict[str, list[tuple[np.ndarray, tuple[int, int]]]], list[str]]:
    """Each traced fact's [T, L] indirect effects per kind (restored - corrupted) with its
    subject range, and the warnings about the facts."""
    fact_units = [u for u in per_unit if u != "known"]
    warnings: list[str] = []
    effects: dict[str, list[tuple[np.ndarray, tuple[int, int]]]] = {k: [] for k in kinds}
    for u in fact_units:
        mu = per_unit[u]
        rng = (int(mu["subject_start"]), int(mu["subject_end"]))
        n_tok = int(mu["n_tokens"])
        rows = token_layer[token_layer["unit"] == u]
        for k in kinds:
            r = pd.DataFrame(rows[rows["kind"] == k])
            grid = np.full((n_tok, n_layers), np.nan)
            grid[r["token_index"].to_numpy(int), r["layer"].to_numpy(int)] = r["value"].to_numpy(float)
            effects[k].append((grid - mu["p_corrupted"], rng))
        if mu.get("known", 1.0) == 0.0:
            warnings.append("the model does not predict this answer (top-1): tracing it may be meaningless")
    n_multi = sum(per_unit[u]["n_answer_tokens"] > 1 for u in fact_units)
    if n_multi:
        warnings.append(f"{n_multi} of {len(fact_units)} answers are several tokens: traced on the first token")
    return effects, warnings


def _bucket_averages(
    effects: Mapping[str, Sequence[tuple[np.ndarray, tuple[int, int]]]], kinds: Sequence[str], summary: dict[str, Any]
) -> pd.DataFrame:
    """The summary's token_layer table: per kind (``avg_indirect_<kind>``) the average indirect
    effect of each ROME bucket per layer (item and token = the bucket, token_index = its place
    in BUCKETS); the peak layer and value of the last-subject and last buckets go to ``summary``."""
    rows: list[tuple[str, str, int, str, int, float]] = []
    for k in kinds:
        b = average_buckets(effects[k])
        rows.extend(
            (f"avg_indirect_{k}", bucket, BUCKETS.index(bucket), bucket, int(layer), float(value))
            for bucket, layer, value in zip(b["bucket"], b["layer"], b["value"], strict=True)
        )
        for bucket in ("last_subject", "last"):
            sub = pd.DataFrame(b[b["bucket"] == bucket])
            if len(sub):
                values = sub["value"].to_numpy(float)
                best = int(np.argmax(values))
                summary[f"peak_layer_{k}_{bucket}"] = int(sub["layer"].to_numpy()[best])
                summary[f"peak_value_{k}_{bucket}"] = float(values[best])
    return tables.token_layer(rows)


def peak_depth_interval(
    effects: Sequence[tuple[np.ndarray, tuple[int, int]]], n_layers: int, bucket: str = "last_subject"
) -> Interval:
    """The relative depth (layer / n_layers) at which the facts' average effect in ``bucket``
    peaks, with its bootstrap interval over the facts (each resample averages the resampled
    facts again and takes the peak). Below :data:`PEAK_MIN_FACTS` facts the resamples are too
    few to bound anything (2 facts give 3 distinct resamples): no interval (nan bounds)."""

    def depth(index: np.ndarray) -> float:
        b = average_buckets([effects[int(i)] for i in index])
        sub = pd.DataFrame(b[b["bucket"] == bucket])
        return int(sub["layer"].to_numpy()[int(np.argmax(sub["value"].to_numpy(float)))]) / n_layers

    if len(effects) < PEAK_MIN_FACTS:
        value = depth(np.arange(len(effects)))
        return Interval(value, math.nan, math.nan, len(effects), "bca-bootstrap", 0.95)
    return bootstrap_interval(np.arange(len(effects)), depth, n_resamples=PEAK_RESAMPLES)


# Each resample re-averages the facts' [T, L] grids; 1,999 keep that under a second for tens of
# facts, with a Monte Carlo error of a 95 % percentile bound well below the spread over facts.
PEAK_RESAMPLES = 1_999
# The fewest facts a bootstrap of the peak's depth is computed from: the peak is a discrete
# argmax, and with a handful of facts the bootstrap distribution has a few atoms (Efron &
# Tibshirani 1993 warn against percentile-type intervals for very small n).
PEAK_MIN_FACTS = 10


@register
class CausalTraceDetector(_FactsDetector[CausalTraceConfig]):
    name = "causal-trace"
    description = "ROME causal tracing: restore states, MLP and attention windows into subject-noised runs"
    output = "token_layer"
    # The default scan traces the first 2 known facts with 3 noise samples instead of ROME's 10
    # (noisier maps, about a third of the time), so the Causal tracing page has a first look.
    in_default_scan = True
    scan_params: ClassVar[dict[str, Any]] = {"limit": 2, "samples": 3}
    Config = CausalTraceConfig

    def variant(self, cfg: CausalTraceConfig) -> str:
        return "faithful"

    def method_text(self, cfg: CausalTraceConfig) -> str:
        return (
            "causal tracing as ROME's reference code (Meng et al. 2022): Gaussian noise on the subject "
            "embeddings of N corrupted copies, each (token, layer) state or MLP/attention window restored "
            "from the clean run; score = mean p(answer's first token) over the corrupted copies"
        )

    def noise_std(self, model: LoadedModel, cfg: CausalTraceConfig) -> tuple[float, float | None]:
        """(noise std, measured subject-embedding std or None when overridden)."""
        if cfg.noise > 0:
            return float(cfg.noise), None
        std = self.memo(
            "std", model, cfg, lambda: subject_embedding_std(model, [f.subject for f in self._facts(model, cfg)])
        )
        return cfg.noise_factor * std, std

    def trace_prompt(
        self, model: LoadedModel, cfg: CausalTraceConfig, prompt: str, subject: str, answer: str
    ) -> PromptTrace:
        """Trace one prompt as a run with ``cfg`` traces a fact (same noise: ``cfg.noise``, else
        noise_factor x the std of the facts file's subjects; samples, window, kinds, seed), with
        a heatmap of restored p(answer) per kind. UserError for a subject not in the prompt."""
        inp = prepare(model, prompt, subject, answer)
        result = trace_fact(model, inp, noise_std=self.noise_std(model, cfg)[0], samples=cfg.samples,
                            window=cfg.window, seed=cfg.seed, kinds=cfg.kinds, memory_mb=cfg.memory_mb)
        return PromptTrace(result, {kind: heatmap_figure(result, kind) for kind in cfg.kinds})

    def run_unit(self, model: LoadedModel, cfg: CausalTraceConfig, unit: Unit) -> UnitResult:
        if unit.group == "known":
            noise, std = self.noise_std(model, cfg)
            res = self._known_unit(model, cfg)
            extra = {"noise_std": noise} | ({} if std is None else {"subject_embedding_std": std})
            res.tables["metrics"] = pd.concat([res.tables["metrics"], tables.metrics(extra, n=1)], ignore_index=True)
            return res
        return super().run_unit(model, cfg, unit)

    # A fact's trace splits by cells: each part recomputes the base run (one forward pass) and
    # restores its share of the (kind, token, layer) cells; the driver joins them.
    def max_parts(self, model: LoadedModel, cfg: CausalTraceConfig, unit: Unit) -> int:
        if unit.group == "known":
            return 1
        inp = prepare_fact(model, self._fact_of(model, cfg, unit))
        return len(cfg.kinds) * inp.n_tokens * model.info.n_layers

    def run_part(self, model: LoadedModel, cfg: CausalTraceConfig, part: Part) -> dict[str, Any]:
        inp = prepare_fact(model, self._fact_of(model, cfg, part.unit))
        return trace_part(model, inp, noise_std=self.noise_std(model, cfg)[0], samples=cfg.samples,
                          window=cfg.window, seed=cfg.seed, kinds=cfg.kinds, memory_mb=cfg.memory_mb,
                          part=part.index, n_parts=part.count)

    def join_parts(
        self, model: LoadedModel, cfg: CausalTraceConfig, unit: Unit, parts: Sequence[Any]
    ) -> UnitResult:
        noise, _ = self.noise_std(model, cfg)
        fact = self._fact_of(model, cfg, unit)
        inp = prepare_fact(model, fact)
        result = joined_trace(model, inp, parts, noise_std=noise, samples=cfg.samples, window=cfg.window,
                              seed=cfg.seed, kinds=cfg.kinds)
        metrics = {
            "p_clean": result.p_clean,
            "p_corrupted": result.p_corrupted,
            "total_effect": result.total_effect,
            "noise_std": noise,
            "subject_start": inp.subject_range[0],
            "subject_end": inp.subject_range[1],
            "n_tokens": inp.n_tokens,
            "n_answer_tokens": inp.n_answer_tokens,
        }
        if unit.index is None:
            metrics["known"] = self._single_known(model, fact, cfg)
        doc = {
            **fact.to_dict(),
            "tokens": list(inp.token_strs),
            "subject_range": list(inp.subject_range),
            "answer_token": model.tokenizer.decode([inp.target]),
        }
        return UnitResult(
            tables={
                "token_layer": result.to_frame(item=fact.id),
                "metrics": tables.metrics(metrics, n=1),
                "artifacts": tables.artifact("fact", doc),
            }
        )

    def finalize(
        self, model: LoadedModel, cfg: CausalTraceConfig, results: Mapping[str, pd.DataFrame]
    ) -> Summary:
        per_unit = _per_unit(results["metrics"])
        fact_units = [u for u in per_unit if u != "known"]
        effects, warnings = _fact_effects(per_unit, results["token_layer"], cfg.kinds, model.info.n_layers)
        summary: dict[str, Any] = {"n_facts_traced": len(fact_units)}
        if "known" in per_unit:
            summary.update({k: per_unit["known"][k] for k in KNOWN_METRICS})
        for name in ("p_clean", "p_corrupted", "total_effect"):
            summary[f"mean_{name}"] = float(np.mean([per_unit[u][name] for u in fact_units]))
        summary["noise_std"] = float(per_unit[fact_units[0]]["noise_std"])
        table = _bucket_averages(effects, cfg.kinds, summary)
        summary.update(samples=cfg.samples, window=cfg.window, answer_mode=cfg.answer_mode)
        intervals = {f"mean_{name}": mean_interval([per_unit[u][name] for u in fact_units])
                     for name in ("p_clean", "p_corrupted", "total_effect")}
        if "mlp" in cfg.kinds:
            intervals["peak_depth_mlp_last_subject"] = peak_depth_interval(effects["mlp"], model.info.n_layers)
        return Summary(metrics=summary, intervals=intervals,
            warnings=sorted(set(warnings)),
            tables={"token_layer": table, "metrics": tables.metrics(summary, n=len(fact_units))},
        )


def run_inline(model: LoadedModel, name: str, **params: Any) -> tuple[Summary, dict[str, pd.DataFrame]]:
    """Run a detector of this module without the store (notebooks, tests): units, then finalize.
    Returns the summary and the units' concatenated tables."""
    if name not in ("causal-trace", "attention-knockout"):
        raise UserError(f"run_inline runs causal-trace or attention-knockout, not {name!r}")
    return run_in_memory(model, get_detector(name), params)


# --------------------------------------------------------------------------- figures


