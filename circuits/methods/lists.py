"""Token lists for episodic-memory tests: repeated random lists and Mistry et al. 2025's lists of
frequent tokens repeated in a random order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from circuits.data.texts import TEXT_SAMPLE
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.model.tokens import repeated_random_tokens

if TYPE_CHECKING:
    pass


@dataclass
class ListPrompts:
    """Token lists presented twice: ``tokens`` [b, seq]; the first list starts at ``offset``
    and has length R; second-list query k sits at ``offset + R + k`` and shows the token of
    first-list position ``match[b, k]``."""

    tokens: torch.Tensor
    offset: int
    length: int
    match: torch.Tensor


def repeated_lists(model: LoadedModel, batch: int, length: int, seed: int) -> ListPrompts:
    tokens = repeated_random_tokens(model, batch, length, seed)
    return ListPrompts(tokens, len(model.prefix), length, torch.arange(length).expand(batch, length).clone())


def frequent_tokens(model: LoadedModel, n: int) -> tuple[list[int], int]:
    """The n most frequent tokens of the bundled English text (ties by id), special tokens
    excluded; filled from the lowest ordinary ids when the text has fewer. Returns the ids and
    how many came from the fill."""
    specials = {int(i) for i in getattr(model.tokenizer, "all_special_ids", []) if i is not None}
    ids = model.tokenizer(TEXT_SAMPLE.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    uniq, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
    ranked = sorted((-int(c), int(t)) for t, c in zip(uniq, counts, strict=True) if int(t) not in specials)
    chosen = [t for _, t in ranked[:n]]
    filled = 0
    tid = 0
    have = set(chosen)
    while len(chosen) < n and tid < model.info.vocab_size:
        if tid not in have and tid not in specials:
            chosen.append(tid)
            filled += 1
        tid += 1
    if len(chosen) < n:
        raise UserError(f"the vocabulary has fewer than {n} ordinary tokens")
    return chosen, filled


def mistry_lists(model: LoadedModel, batch: int, length: int, seed: int) -> ListPrompts:
    """Mistry et al. 2025: the ``length`` most frequent tokens in a random order, then again in
    another random order (after the prompt prefix, when the model has one)."""
    vocab, _ = frequent_tokens(model, length)
    pool = torch.tensor(vocab)
    gen = torch.Generator().manual_seed(seed)
    rows, matches = [], []
    for _ in range(batch):
        first = pool[torch.randperm(length, generator=gen)]
        order = torch.randperm(length, generator=gen)  # second-list k shows first-list order[k]
        rows.append(torch.cat([torch.tensor(model.prefix.ids, dtype=torch.long), first, first[order]]))
        matches.append(order)
    return ListPrompts(torch.stack(rows), len(model.prefix), length, torch.stack(matches))
