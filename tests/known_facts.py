"""Facts a tiny random model "knows" (its own top-1 answers), and the conflict detectors pointed
at them, for the unit tests of conflict-heads, PH3 and the runs built on them."""

from __future__ import annotations

import pytest
import torch

from circuits.data import conflicts
from circuits.data.facts import Fact
from interp.model.loaded import LoadedModel


def own_answer_facts(model: LoadedModel, n: int) -> list[Fact]:
    """Facts whose answer is the tiny model's own top-1 token, so the model 'knows' them."""
    facts = []
    for i in range(n):
        prompt = f"w{20 + i} w{60 + i} w{90 + i}"
        with torch.no_grad():
            top = int(model.run(model.to_tokens(prompt)).logits[0, -1].argmax())
        facts.append(Fact(f"w{20 + i}", prompt, str(model.tokenizer.decode([top])).strip(), "r", "t"))
    return facts


def use_known_facts(model: LoadedModel, monkeypatch: pytest.MonkeyPatch, n: int = 24) -> LoadedModel:
    """``model``, with the conflict detectors' facts replaced by ``n`` facts it knows."""
    facts = own_answer_facts(model, n)
    monkeypatch.setattr(conflicts, "load_facts", lambda source=None: list(facts))
    return model
