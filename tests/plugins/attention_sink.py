"""Attention-sink heads (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
Sinks", section 3.1): heads that park their attention on the first token whatever it is.

Score of head (l, h): its mean attention to position 0 from every later position of random-token
prompts. The whole detector is this file; a package registers it by naming this module in its
``interp.plugins`` entry point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from interp.model.loaded import LoadedModel
from interp.model.tokens import repeated_random_tokens
from interp.runs.config import SEED_MAX, DetectorConfig, param
from interp.runs.head_scores import HeadMeans, HeadScoreDetector, UnitScores
from interp.runs.registry import register
from interp.runs.units import Unit


@dataclass(frozen=True)
class SinkConfig(DetectorConfig):
    seq_len: int = param(32, "random tokens per prompt", low=2)
    n_prompts: int = param(4, "prompts, one stored unit each", low=1)
    seed: int = param(0, "random seed of the prompts", low=0, high=SEED_MAX)


@register
class AttentionSinkDetector(HeadScoreDetector[SinkConfig]):
    name = "attention-sink"
    description = "Heads that attend to the first token (Xiao et al. 2023)"
    Config = SinkConfig
    score = "sink"

    def variant(self, cfg: SinkConfig) -> str:
        return "first-token-mass"

    def units(self, model: LoadedModel, cfg: SinkConfig) -> list[Unit]:
        model.check_length(cfg.seq_len + len(model.prefix))
        return [Unit("prompt", i) for i in range(cfg.n_prompts)]

    def prompt(self, model: LoadedModel, cfg: SinkConfig, i: int) -> torch.Tensor:
        """Prompt i: the prompt prefix and seq_len random tokens (one copy of the block)."""
        tokens = repeated_random_tokens(model, 1, cfg.seq_len, seed=cfg.seed * 100_003 + i)
        return tokens[:, : len(model.prefix) + cfg.seq_len]

    def example_tokens(self, model: LoadedModel, cfg: SinkConfig) -> torch.Tensor:
        return self.prompt(model, cfg, 0)

    def score_unit(self, model: LoadedModel, cfg: SinkConfig, unit: Unit) -> UnitScores:
        tokens = self.prompt(model, cfg, int(unit.index or 0))
        with torch.no_grad():
            out = model.run(tokens, cache=["pattern.*"])
        sink = torch.stack([out.cache[f"pattern.{layer}"][0, :, 1:, 0].mean(-1) for layer in range(model.info.n_layers)])
        return UnitScores({"sink": sink})

    def summary_metrics(self, model: LoadedModel, cfg: SinkConfig, heads: list[dict[str, Any]],
                        means: HeadMeans) -> dict[str, Any]:
        return {"n_prompts": cfg.n_prompts, "n_heads_above_half": sum(h["score"] > 0.5 for h in heads)}
