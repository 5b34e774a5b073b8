"""Previous-token, duplicate-token and induction (prefix-matching) heads.

Olsson et al. 2022: on the prompt prefix + R random tokens repeated twice, the
score of head (l, h) is its mean attention from each second-copy position t to
- t - R + 1 (induction: the token after the previous occurrence of the current token),
- t - R (duplicate token), and
- t - 1 (previous token),
averaged over the second copy only and over the batch. Prompts are processed in batches
(units), each committed to the store when done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float

from interp.model.interventions import Intervention
from interp.model.loaded import LoadedModel
from interp.model.tokens import repeated_random_tokens
from interp.runs.config import SEED_MAX, DetectorConfig, param
from interp.runs.head_scores import HeadMeans, HeadScoreDetector, UnitScores
from interp.runs.registry import register
from interp.runs.units import Unit

INDUCTION_THRESHOLD = 0.4


def head_scores_from_patterns(
    patterns: Sequence[Float[torch.Tensor, "batch head q k"]], seq_len: int, offset: int
) -> dict[str, Float[torch.Tensor, "layer head"]]:
    """Per-head scores from each layer's attention pattern on repeated tokens.

    ``offset`` is 1 when a prefix token precedes the first copy. Second-copy query positions are
    offset + R .. offset + 2R - 1; the first copy starts at ``offset``.
    """
    r = seq_len
    q = torch.arange(offset + r, offset + 2 * r)
    targets = {"induction": q - r + 1, "duplicate_token": q - r, "previous_token": q - 1}
    out: dict[str, torch.Tensor] = {}
    for metric, k in targets.items():
        out[metric] = torch.stack([p[:, :, q, k].mean(dim=(0, 2)) for p in patterns])
    return out


def copy_losses(
    logits: Float[torch.Tensor, "batch seq vocab"], tokens: torch.Tensor, seq_len: int, offset: int
) -> tuple[float, float]:
    """Mean next-token loss over the first copy and over the second copy (predicted positions)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0]
    # Row t of nll predicts token t+1. First-copy targets: offset+1 .. offset+R-1.
    first = nll[:, offset : offset + seq_len - 1].mean().item()
    second = nll[:, offset + seq_len : offset + 2 * seq_len - 1].mean().item()
    return first, second


def second_copy_loss(
    model: LoadedModel, tokens: torch.Tensor, seq_len: int, interventions: Sequence[Intervention] = ()
) -> float:
    """Loss on the second copy of repeated tokens, with interventions applied."""
    with torch.no_grad():
        logits = model.run(tokens, interventions=interventions).logits
    return copy_losses(logits, tokens, seq_len, len(model.prefix))[1]


@dataclass(frozen=True)
class InductionConfig(DetectorConfig):
    """Parameters of the induction scan (each field's help says what it is)."""

    seq_len: int = param(50, "length R of the random block (repeated twice)", low=2)
    n_prompts: int = param(20, "number of repeated-token prompts", low=1)
    batch_size: int = param(5, "prompts per forward pass (one stored unit each)", low=1)
    seed: int = param(0, "random seed of the token batch", low=0, high=SEED_MAX)


@register
class InductionDetector(HeadScoreDetector[InductionConfig]):
    name = "induction"
    description = "Previous-token, duplicate-token and induction (prefix-matching) scores on repeated random tokens"
    head_columns: ClassVar[dict[str, str]] = {"previous_token": "prev-token", "duplicate_token": "dup-token"}
    in_default_scan = True
    Config = InductionConfig
    score = "induction"
    fields = ("previous_token", "duplicate_token")

    def variant(self, cfg: InductionConfig) -> str:
        return "second-copy-only"

    def method_text(self, cfg: InductionConfig) -> str:
        return ("mean attention from each second-copy position of repeated random tokens to the "
                "induction, duplicate and previous token (Olsson et al. 2022), averaged over prompts")

    def units(self, model: LoadedModel, cfg: InductionConfig) -> list[Unit]:
        model.check_length(2 * cfg.seq_len + len(model.prefix))
        n, b = cfg.n_prompts, cfg.batch_size
        return [Unit("batch", i) for i in range((n + b - 1) // b)]

    def tokens(self, model: LoadedModel, cfg: InductionConfig, unit: Unit) -> torch.Tensor:
        i = int(unit.index or 0)
        n, b = cfg.n_prompts, cfg.batch_size
        return repeated_random_tokens(model, min(b, n - i * b), cfg.seq_len, seed=cfg.seed * 100_003 + i)

    def example_tokens(self, model: LoadedModel, cfg: InductionConfig) -> torch.Tensor:
        return self.tokens(model, cfg, Unit("batch", 0))

    def score_unit(self, model: LoadedModel, cfg: InductionConfig, unit: Unit) -> UnitScores:
        tokens = self.tokens(model, cfg, unit)
        with torch.no_grad():
            out = model.run(tokens, cache=["pattern.*"])
        patterns = [out.cache[f"pattern.{layer}"] for layer in range(model.info.n_layers)]
        scores = head_scores_from_patterns(patterns, cfg.seq_len, len(model.prefix))
        first, second = copy_losses(out.logits, tokens, cfg.seq_len, len(model.prefix))
        return UnitScores(scores, n=int(tokens.shape[0]),
                          metrics={"first_copy_loss": first, "second_copy_loss": second})

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
