"""Synthetic token inputs shared by several detectors."""

from __future__ import annotations

import torch
from jaxtyping import Int

from interp.model.loaded import LoadedModel


def ordinary_token_range(model: LoadedModel) -> tuple[int, int]:
    """A range of token ids away from special tokens and the rarest ids at the end of a vocab.

    Large vocabularies put special and byte tokens first and rare merges last; small test
    vocabularies have only a handful of specials at the start.
    """
    vocab = model.info.vocab_size
    specials = [int(i) for i in getattr(model.tokenizer, "all_special_ids", []) if i is not None]
    low = max([*specials, 0]) + 1 if vocab < 1000 else max(1000, max([*specials, 0]) + 1)
    high = vocab if vocab < 1000 else min(vocab, 20000)
    if high - low < 10:
        low, high = 0, vocab
    return low, high


def random_blocks(
    model: LoadedModel, batch: int, length: int, seed: int, n_blocks: int
) -> tuple[Int[torch.Tensor, "batch prefix"], list[Int[torch.Tensor, "batch length"]]]:
    """The prompt prefix (batch rows) and ``n_blocks`` blocks of ``length`` random ordinary
    tokens, drawn one after the other from a CPU generator seeded with ``seed``: the same seed
    gives the same blocks on every machine, and the first block does not depend on ``n_blocks``."""
    low, high = ordinary_token_range(model)
    gen = torch.Generator().manual_seed(seed)
    blocks = [torch.randint(low, high, (batch, length), generator=gen) for _ in range(n_blocks)]
    prefix = torch.tensor(model.prefix.ids, dtype=torch.long).expand(batch, len(model.prefix))
    return prefix, blocks


def repeated_random_tokens(
    model: LoadedModel, batch: int, length: int, seed: int
) -> Int[torch.Tensor, "batch seq"]:
    """The prompt prefix (when the model has one) + ``length`` random tokens, repeated twice.

    Drawn from a CPU generator seeded with ``seed``, so the same seed gives the same batch on
    every machine.
    """
    prefix, (block,) = random_blocks(model, batch, length, seed, 1)
    return torch.cat([prefix, block, block], dim=1)
