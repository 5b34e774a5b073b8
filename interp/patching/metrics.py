"""What a sweep measures: metrics evaluated on the device for a whole chunk of rows at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from interp.errors import UserError
from interp.patching.sweeps import _norm_pos


class Metric(Protocol):
    """What a sweep measures, evaluated on the device for a whole chunk at once.

    ``positions``: the positions whose logits are read (None: all); the logits handed to
    ``__call__`` hold only those, [rows, len(positions), vocab]. ``prompt_index`` maps each row
    to its prompt, so per-prompt answers can be gathered. Returns one value per row.
    """

    @property
    def name(self) -> str: ...

    @property
    def positions(self) -> tuple[int, ...] | None: ...

    def __call__(self, logits: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor: ...


def _ids(x: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in (x.tolist() if isinstance(x, torch.Tensor) else x))


@dataclass(frozen=True)
class LogitDiff:
    """logit[correct[i]] - logit[wrong[i]] at one position, for prompt i."""

    correct: Sequence[int]
    wrong: Sequence[int]
    position: int = -1
    name: str = "logit_diff"

    def __post_init__(self) -> None:
        object.__setattr__(self, "correct", _ids(self.correct))
        object.__setattr__(self, "wrong", _ids(self.wrong))
        if len(self.correct) != len(self.wrong):
            raise UserError("logit_diff: give one correct and one wrong token per prompt")

    @property
    def positions(self) -> tuple[int, ...]:
        return (self.position,)

    def on_vocab(self) -> tuple[tuple[int, ...], LogitDiff]:
        """The token ids this metric reads, and the same metric over the logits of those alone
        (the engine then unembeds only them)."""
        vocab = tuple(sorted(set(self.correct) | set(self.wrong)))
        at = {t: i for i, t in enumerate(vocab)}
        return vocab, LogitDiff([at[t] for t in self.correct], [at[t] for t in self.wrong], self.position, self.name)

    def __call__(self, logits: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        lg = logits[:, 0, :]
        c = torch.tensor(self.correct, device=lg.device)[prompt_index]
        w = torch.tensor(self.wrong, device=lg.device)[prompt_index]
        return lg.gather(1, c[:, None])[:, 0] - lg.gather(1, w[:, None])[:, 0]


@dataclass(frozen=True)
class LogProb:
    """log p(target[i]) at one position, for prompt i."""

    target: Sequence[int]
    position: int = -1
    name: str = "logprob"

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", _ids(self.target))

    @property
    def positions(self) -> tuple[int, ...]:
        return (self.position,)

    def __call__(self, logits: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        lg = logits[:, 0, :]
        # Half precision up to float32 for the softmax; a float64 run stays float64.
        logp = torch.log_softmax(lg if lg.dtype == torch.float64 else lg.float(), dim=-1)
        t = torch.tensor(self.target, device=logp.device)[prompt_index]
        return logp.gather(1, t[:, None])[:, 0]


@dataclass(frozen=True)
class Prob(LogProb):
    """p(target[i]) at one position, for prompt i (ROME's causal-tracing score)."""

    name: str = "prob"

    def __call__(self, logits: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        return super().__call__(logits, prompt_index).exp()


def _check_metric(metric: Any, n_prompts: int) -> None:
    if not callable(metric) or not hasattr(metric, "positions"):
        raise UserError("metric must be a Metric (LogitDiff, LogProb, Prob or an object with positions and __call__)")
    for attr in ("correct", "wrong", "target"):
        ids = getattr(metric, attr, None)
        if ids is not None and len(ids) != n_prompts:
            raise UserError(f"metric {getattr(metric, 'name', '?')}: {len(ids)} answer tokens for {n_prompts} prompts")


def _logit_positions(metric: Metric, seq_len: int) -> tuple[int, ...] | None:
    pos = metric.positions
    return None if pos is None else tuple(_norm_pos(p, seq_len) for p in pos)
