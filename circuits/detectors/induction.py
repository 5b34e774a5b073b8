"""Previous-token, duplicate-token and induction (prefix-matching) heads, each against its null.

Olsson et al. 2022: on the prompt prefix + R random tokens repeated twice, the
score of head (l, h) is its mean attention from each second-copy position t to
- t - R + 1 (induction: the token after the previous occurrence of the current token),
- t - R (duplicate token), and
- t - 1 (previous token),
averaged over the second copy only and over the batch. Prompts are processed in batches
(units), each committed to the store when done.

Nulls (measured, beside Olsson et al.'s fixed threshold of 0.4 on the induction score): every
prompt prefix + A + A has a twin prefix + A + B, B drawn independently (no repeats; tokens of B
match A only by chance), run as extra rows of the same forward pass. The same scores at the same
query and key positions on the twins are ``induction_null``, ``duplicate_token_null`` and
``previous_token_null``: what a head gets when there is nothing to match, i.e. attention to those
offsets by position, by token statistics and by chance. A head is above its null when the paired
t interval of its per-prompt score minus its twin's lies above 0, Bonferroni-adjusted over all
heads (``circuits.methods.nulls``; ``level`` is the family-wise level).

The previous-token null on the twins is reported as the issue asks, but it is not informative:
attending to t - 1 needs no repeat, so a previous-token head scores the same on both and is
(rightly) not above it; only a head whose t - 1 attention rises with repeats is. The null that
says whether a head attends to the previous token at all is positional: a head that attends
uniformly over its causal window gives t - 1 the share 1 / (t + 1) at query position t
(``previous_token_uniform``, the mean over the second-copy queries); a head is above it by the
same paired rule with that constant as every prompt's null. It is a weak null (any head with a
recency bias passes), so read it next to the score, not instead of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from circuits.methods.nulls import RULE, NullTest, above_null, stack_items
from interp.model.interventions import Intervention
from interp.model.loaded import LoadedModel
from interp.model.tokens import random_blocks
from interp.runs import tables
from interp.runs.config import SEED_MAX, DetectorConfig, param
from interp.runs.head_scores import HeadMeans, HeadScoreDetector, UnitScores
from interp.runs.registry import Summary, register
from interp.runs.units import Unit
from interp.stats import Interval, mean_interval

INDUCTION_THRESHOLD = 0.4


def sequence_scores_from_patterns(
    patterns: Sequence[Float[torch.Tensor, "batch head q k"]], seq_len: int, offset: int
) -> dict[str, Float[torch.Tensor, "batch layer head"]]:
    """Per-prompt, per-head scores from each layer's attention pattern on repeated tokens.

    ``offset`` is 1 when a prefix token precedes the first copy. Second-copy query positions are
    offset + R .. offset + 2R - 1; the first copy starts at ``offset``.
    """
    r = seq_len
    q = torch.arange(offset + r, offset + 2 * r)
    targets = {"induction": q - r + 1, "duplicate_token": q - r, "previous_token": q - 1}
    out: dict[str, torch.Tensor] = {}
    for metric, k in targets.items():
        out[metric] = torch.stack([p[:, :, q, k].mean(dim=2) for p in patterns], dim=1)
    return out


def head_scores_from_patterns(
    patterns: Sequence[Float[torch.Tensor, "batch head q k"]], seq_len: int, offset: int
) -> dict[str, Float[torch.Tensor, "layer head"]]:
    """Per-head scores (:func:`sequence_scores_from_patterns` averaged over the batch)."""
    return {m: v.mean(dim=0) for m, v in sequence_scores_from_patterns(patterns, seq_len, offset).items()}


def uniform_previous_token_share(seq_len: int, offset: int) -> float:
    """The attention to t - 1 of a head uniform over its causal window (1 / (t + 1) at query
    position t), averaged over the second-copy queries: the positional null of the
    previous-token score."""
    q = torch.arange(offset + seq_len, offset + 2 * seq_len, dtype=torch.float64)
    return float((1.0 / (q + 1)).mean())


def twin_tokens(
    model: LoadedModel, batch: int, length: int, seed: int
) -> tuple[Int[torch.Tensor, "batch seq"], Int[torch.Tensor, "batch seq"]]:
    """:func:`repeated_random_tokens` (prefix + A + A, the same tokens for the same seed) and its
    twins without repeats, prefix + A + B, B the generator's next draw."""
    prefix, (first, second) = random_blocks(model, batch, length, seed, 2)
    return torch.cat([prefix, first, first], dim=1), torch.cat([prefix, first, second], dim=1)


def prompt_copy_losses(
    logits: Float[torch.Tensor, "batch seq vocab"], tokens: torch.Tensor, seq_len: int, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's mean next-token loss over its first copy and over its second copy
    (predicted positions), as two [batch] tensors."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0]
    # Row t of nll predicts token t+1. First-copy targets: offset+1 .. offset+R-1.
    return nll[:, offset : offset + seq_len - 1].mean(-1), nll[:, offset + seq_len : offset + 2 * seq_len - 1].mean(-1)


def copy_losses(
    logits: Float[torch.Tensor, "batch seq vocab"], tokens: torch.Tensor, seq_len: int, offset: int
) -> tuple[float, float]:
    """Mean next-token loss over the first copy and over the second copy (predicted positions);
    every prompt has as many positions, so the mean of the prompts' means."""
    first, second = prompt_copy_losses(logits, tokens, seq_len, offset)
    return first.mean().item(), second.mean().item()


def second_copy_loss(
    model: LoadedModel, tokens: torch.Tensor, seq_len: int, interventions: Sequence[Intervention] = ()
) -> float:
    """Loss on the second copy of repeated tokens, with interventions applied."""
    with torch.no_grad():
        logits = model.run(tokens, interventions=interventions).logits
    return copy_losses(logits, tokens, seq_len, len(model.prefix))[1]


# Each score and its null: the score on the twins without repeats (the first three), and the
# positional null of the previous-token score (see the module docstring).
NULLS: dict[str, tuple[str, str]] = {
    "induction_above_null": ("induction", "induction_null"),
    "duplicate_token_above_null": ("duplicate_token", "duplicate_token_null"),
    "previous_token_above_null": ("previous_token", "previous_token_null"),
    "previous_token_above_uniform": ("previous_token", "previous_token_uniform"),
}
PER_PROMPT = "per_prompt_scores"
# A unit's per-prompt first- and second-copy losses (their intervals over the prompts).
PER_PROMPT_LOSSES = "per_prompt_copy_losses"
COPY_LOSSES = ("first_copy_loss", "second_copy_loss")


@dataclass(frozen=True)
class InductionConfig(DetectorConfig):
    """Parameters of the induction scan (each field's help says what it is)."""

    seq_len: int = param(50, "length R of the random block (repeated twice)", low=2)
    n_prompts: int = param(20, "number of repeated-token prompts (each with a twin without repeats)", low=1)
    batch_size: int = param(5, "prompts per forward pass, twice the rows with their twins (one unit each)", low=1)
    seed: int = param(0, "random seed of the token batch", low=0, high=SEED_MAX)
    level: float = param(0.95, "family-wise confidence level of the above-null tests over all heads",
                         low=0, high=1, low_open=True, high_open=True)


def per_prompt_scores(results: Mapping[str, pd.DataFrame]) -> dict[str, np.ndarray]:
    """Each score's and null's [prompts, layers, heads] values from the units' per-prompt
    artifacts; empty when no unit stored them (units stored before the nulls)."""
    docs = tables.read_artifacts(results.get("artifacts"), PER_PROMPT)
    return {m: stack_items([np.asarray(d[m]) for d in docs]) for m in docs[0]} if docs else {}


def loss_intervals(results: Mapping[str, pd.DataFrame], n_prompts: int) -> dict[str, Interval]:
    """The copy losses' t intervals over the prompts, when every unit stored its prompts' losses
    (units stored before them have only their means: no interval)."""
    docs = tables.read_artifacts(results.get("artifacts"), PER_PROMPT_LOSSES)
    values = {m: [x for d in docs for x in d[m]] for m in COPY_LOSSES}
    if len(values[COPY_LOSSES[0]]) != n_prompts:
        return {}
    return {m: mean_interval(v) for m, v in values.items()}


def null_tests(per: Mapping[str, np.ndarray], uniform: float, level: float) -> dict[str, NullTest]:
    """Every head against each of its nulls (:data:`NULLS`), from the per-prompt scores."""
    per = {**per, "previous_token_uniform": np.full_like(per["previous_token"], uniform)}
    return {name: above_null(per[score], per[null], level) for name, (score, null) in NULLS.items()}


@register
class InductionDetector(HeadScoreDetector[InductionConfig]):
    name = "induction"
    description = "Previous-token, duplicate-token and induction (prefix-matching) scores on repeated random tokens"
    head_columns: ClassVar[dict[str, str]] = {"previous_token": "prev-token", "duplicate_token": "dup-token",
                                              "induction_null": "null", "induction_above_null": "> null"}
    in_default_scan = True
    Config = InductionConfig
    score = "induction"
    fields = ("previous_token", "duplicate_token", "induction_null", "duplicate_token_null", "previous_token_null")

    def variant(self, cfg: InductionConfig) -> str:
        return "second-copy-only"

    def method_text(self, cfg: InductionConfig) -> str:
        return ("mean attention from each second-copy position of repeated random tokens to the "
                "induction, duplicate and previous token (Olsson et al. 2022), averaged over prompts; "
                "each against the same scores on twins without repeats (prefix + A + B) and the "
                f"previous-token score against uniform causal attention: above its null by a {RULE} "
                f"(family-wise level {cfg.level})")

    def units(self, model: LoadedModel, cfg: InductionConfig) -> list[Unit]:
        model.check_length(2 * cfg.seq_len + len(model.prefix))
        n, b = cfg.n_prompts, cfg.batch_size
        return [Unit("batch", i) for i in range((n + b - 1) // b)]

    def twins(self, model: LoadedModel, cfg: InductionConfig, unit: Unit) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit's repeated prompts and their twins without repeats (:func:`twin_tokens`)."""
        i = int(unit.index or 0)
        n, b = cfg.n_prompts, cfg.batch_size
        return twin_tokens(model, min(b, n - i * b), cfg.seq_len, seed=cfg.seed * 100_003 + i)

    def tokens(self, model: LoadedModel, cfg: InductionConfig, unit: Unit) -> torch.Tensor:
        return self.twins(model, cfg, unit)[0]

    def example_tokens(self, model: LoadedModel, cfg: InductionConfig) -> torch.Tensor:
        return self.tokens(model, cfg, Unit("batch", 0))

    def score_unit(self, model: LoadedModel, cfg: InductionConfig, unit: Unit) -> UnitScores:
        tokens, twins = self.twins(model, cfg, unit)
        b = int(tokens.shape[0])
        with torch.no_grad():  # the twins are rows of the same pass: no second forward
            out = model.run(torch.cat([tokens, twins]), cache=["pattern.*"])
        patterns = [out.cache[f"pattern.{layer}"] for layer in range(model.info.n_layers)]
        per = sequence_scores_from_patterns(patterns, cfg.seq_len, len(model.prefix))
        # float32 first: numpy (and JSON) have no bfloat16, and widening is exact.
        per = {**{m: v[:b].float() for m, v in per.items()}, **{f"{m}_null": v[b:].float() for m, v in per.items()}}
        losses = prompt_copy_losses(out.logits[:b], tokens, cfg.seq_len, len(model.prefix))
        return UnitScores({m: v.mean(dim=0) for m, v in per.items()}, n=b,
                          metrics={m: v.mean().item() for m, v in zip(COPY_LOSSES, losses, strict=True)},
                          artifacts={PER_PROMPT: {m: v.cpu().tolist() for m, v in per.items()},
                                     PER_PROMPT_LOSSES: {m: v.cpu().tolist() for m, v in zip(COPY_LOSSES, losses, strict=True)}})

    def finalize(self, model: LoadedModel, cfg: InductionConfig, results: Mapping[str, pd.DataFrame]) -> Summary:
        summary = super().finalize(model, cfg, results)
        per = per_prompt_scores(results)
        if not per:
            return replace(summary, warnings=[*summary.warnings, "no null scores: every unit of this run was "
                                              "stored before the nulls (rerun in a new workspace to get them)"])
        uniform = uniform_previous_token_share(cfg.seq_len, len(model.prefix))
        tests = null_tests(per, uniform, cfg.level)
        n_heads = model.info.n_heads
        heads = summary.heads or []
        intervals = dict(summary.intervals)
        if heads:  # the top head's score over the prompts (finer than the base's over units)
            intervals["top_score"] = mean_interval(per["induction"][:, heads[0]["layer"], heads[0]["head"]])
        intervals.update(loss_intervals(results, int(summary.metrics["n_prompts"])))
        warnings = list(summary.warnings)
        if len(per["induction"]) < int(summary.metrics["n_prompts"]):
            warnings.append(f"nulls and intervals from {len(per['induction'])} of {int(summary.metrics['n_prompts'])} "
                            "prompts: the other units were stored before the nulls")
        for h in heads:
            h.update({name: bool(t.above[h["layer"] * n_heads + h["head"]]) for name, t in tests.items()})
        metrics = {**summary.metrics, "previous_token_uniform": uniform, "level": cfg.level,
                   "level_per_head": next(iter(tests.values())).level}
        for name, t in tests.items():
            metrics[f"n_{name}"] = t.n_above
            metrics[f"share_{name}"] = t.share_above
        rows = [(name, la, hd, float(t.above[la * n_heads + hd]))
                for name, t in tests.items() for la in range(model.info.n_layers) for hd in range(n_heads)]
        agg = pd.concat([summary.tables["head_scores"], tables.head_scores(rows)], ignore_index=True)
        n = int(metrics["n_prompts"])
        return Summary(heads=heads, metrics=metrics, intervals=intervals, warnings=warnings,
                       tables={"head_scores": agg, "metrics": tables.metrics(metrics, n=n)})

    def summary_metrics(
        self, model: LoadedModel, cfg: InductionConfig, heads: list[dict[str, Any]], means: HeadMeans
    ) -> dict[str, Any]:
        return {
            **means.metrics,
            "n_prompts": int(means.n),
            "threshold": INDUCTION_THRESHOLD,
            "n_heads_above_threshold": sum(h["score"] > INDUCTION_THRESHOLD for h in heads),
            "n_heads": len(heads),
        }
