"""Choosing the next token from a step's scores: greedy, or a draw as transformers' ``generate``
draws (``do_sample`` with ``temperature``, ``top_k`` and ``top_p``, in that order, then one
multinomial draw per row from the softmax), with an optional seed.

The warpers are those of ``transformers.generation.logits_process`` (TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper with one token always kept), so on the same scores and the
same random stream the draws are ``generate``'s. Unlike ``generate``, no top-k applies unless
asked (its default configuration has ``top_k=50``). A seed gives a private generator on the
scores' device: the same prompts, batch size, seed and device give the same tokens; without one
the draws come from torch's global generator (``torch.manual_seed``), as ``generate``'s do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from interp.errors import UserError


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be >= 1 (or None), got {self.top_k}")
        if self.seed is not None and self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")
        if not self.do_sample and (self.temperature != 1.0 or self.top_p != 1.0 or self.top_k is not None
                                   or self.seed is not None):
            raise UserError("temperature, top_p, top_k and seed are sampling options: give do_sample=True")

    @property
    def variant(self) -> str:
        if not self.do_sample:
            return "greedy"
        parts = [f"T={self.temperature:g}", f"top_p={self.top_p:g}"]
        if self.top_k is not None:
            parts.append(f"top_k={self.top_k}")
        parts.append(f"seed={self.seed}" if self.seed is not None else "global-rng")
        return f"sample({','.join(parts)})"

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A fresh generator seeded with ``seed`` on ``device`` (None: the global one)."""
        if not self.do_sample or self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def pick(self, scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One token per row of ``scores`` [rows, vocab]: the argmax, or a draw."""
        if not self.do_sample:
            return scores.argmax(-1)
        scores = scores.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k is not None:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1]))[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - self.top_p)
            remove[..., -1:] = False  # the most likely token always stays
            scores = scores.masked_fill(remove.scatter(1, order, remove), -math.inf)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


__all__ = ["Sampling"]
