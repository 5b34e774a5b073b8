"""Attention-sink heads (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
Sinks", section 3.1): heads that park their attention on the first token whatever it is.

Score of head (l, h): its mean attention to position 0 from every later position of random-token
prompts. The whole detector is this file; a package registers it by naming this module in its
``interp.plugins`` entry point.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch

from interp.model.loaded import LoadedModel
from interp.model.tokens import repeated_random_tokens
from interp.runs import tables
from interp.runs.config import SEED_MAX, DetectorConfig, param
from interp.runs.registry import Detector, Summary, UnitResult, register


@dataclass(frozen=True)
class SinkConfig(DetectorConfig):
    seq_len: int = param(32, "random tokens per prompt", low=2)
    n_prompts: int = param(4, "prompts, one stored unit each", low=1)
    seed: int = param(0, "random seed of the prompts", low=0, high=SEED_MAX)


@register
class AttentionSinkDetector(Detector[SinkConfig]):
    name = "attention-sink"
    description = "Heads that attend to the first token (Xiao et al. 2023)"
    output = "head_scores"
    Config = SinkConfig

    def variant(self, cfg: SinkConfig) -> str:
        return "first-token-mass"

    def units(self, model: LoadedModel, cfg: SinkConfig) -> list[str]:
        model.check_length(cfg.seq_len + len(model.prefix))
        return [f"prompt-{i}" for i in range(cfg.n_prompts)]

    def prompt(self, model: LoadedModel, cfg: SinkConfig, i: int) -> torch.Tensor:
        """Prompt i: the prompt prefix and seq_len random tokens (one copy of the block)."""
        tokens = repeated_random_tokens(model, 1, cfg.seq_len, seed=cfg.seed * 100_003 + i)
        return tokens[:, : len(model.prefix) + cfg.seq_len]

    def example_tokens(self, model: LoadedModel, cfg: SinkConfig) -> torch.Tensor:
        return self.prompt(model, cfg, 0)

    def run_unit(self, model: LoadedModel, cfg: SinkConfig, unit: str) -> UnitResult:
        tokens = self.prompt(model, cfg, int(unit.removeprefix("prompt-")))
        with torch.no_grad():
            out = model.run(tokens, cache=["pattern.*"])
        sink = torch.stack([out.cache[f"pattern.{layer}"][0, :, 1:, 0].mean(-1) for layer in range(model.info.n_layers)])
        return UnitResult(tables={"head_scores": tables.head_grid("sink", sink)})

    def finalize(self, model: LoadedModel, cfg: SinkConfig, results: Mapping[str, pd.DataFrame]) -> Summary:
        mean = results["head_scores"].groupby(["layer", "head"])["value"].mean()
        heads = [{"layer": int(la), "head": int(h), "score": float(v)} for (la, h), v in mean.sort_values(ascending=False).items()]
        return Summary(
            detector=self.name, variant=self.variant(cfg), heads=heads,
            metrics={"n_prompts": cfg.n_prompts, "n_heads_above_half": sum(h["score"] > 0.5 for h in heads)},
            tables={"head_scores": tables.head_scores(("sink", h["layer"], h["head"], h["score"]) for h in heads)},
        )
