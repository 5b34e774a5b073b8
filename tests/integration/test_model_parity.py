"""Backends against plain Hugging Face on the zoo default, and the induction circuit's causal test."""

from __future__ import annotations

import copy

import pytest
import torch

from circuits.detectors.induction import second_copy_loss
from interp.model.interventions import ablate_heads
from interp.model.loaded import LoadedModel
from interp.model.tokens import repeated_random_tokens
from interp.runs.runner import finalized

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def plain_hf(smol: LoadedModel) -> torch.nn.Module:
    """An independent plain-HF copy (eager attention), loaded from the converted folder."""
    from transformers import AutoModelForCausalLM

    from interp.model.zoo import ensure_converted

    folder, _ = ensure_converted("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def test_bridge_and_nnsight_logits_equal_hf(smol: LoadedModel, plain_hf: torch.nn.Module) -> None:
    ids = smol.to_tokens(["The capital of France is Paris, and the capital of Italy is"])
    with torch.no_grad():
        ref = plain_hf(ids).logits
    bridge = smol.run(ids).logits
    nn = LoadedModel(copy.deepcopy(plain_hf), smol.tokenizer, smol.provenance, backend="nnsight")
    nns = nn.run(ids).logits
    assert (bridge - ref).abs().max().item() < 1e-4
    assert (nns - ref).abs().max().item() < 1e-4


def test_zero_ablating_top_induction_heads_beats_random(smol: LoadedModel) -> None:
    from interp.runs.registry import get_detector

    det = get_detector("induction")
    params = det.parse_params({"n_prompts": 10, "batch_size": 5})
    import pandas as pd

    tables: dict[str, list[pd.DataFrame]] = {}
    for unit in det.units(smol, params):
        for name, df in det.run_unit(smol, params, unit).tables.items():
            tables.setdefault(name, []).append(df.assign(unit=unit.key))
    summary = finalized(smol, det, params, {k: pd.concat(v) for k, v in tables.items()})
    assert summary.heads is not None
    top = [(h["layer"], h["head"]) for h in summary.heads[:3]]

    tokens = repeated_random_tokens(smol, 4, 50, seed=123)
    base = second_copy_loss(smol, tokens, 50)
    top_loss = second_copy_loss(smol, tokens, 50, ablate_heads(top))
    gen = torch.Generator().manual_seed(0)
    others = [(la, h) for la in range(smol.info.n_layers) for h in range(smol.info.n_heads) if (la, h) not in top]
    rises = []
    for _ in range(10):
        pick = [others[int(i)] for i in torch.randperm(len(others), generator=gen)[:3]]
        rises.append(second_copy_loss(smol, tokens, 50, ablate_heads(pick)) - base)
    # The random baseline is heavy-tailed: a draw that hits one of the layer-1 heads whose
    # zero-ablation breaks the model everywhere (first copy too) raises the loss by ~10 nats.
    # The median over draws is the typical random head set; the mean is printed beside it.
    median_rise = float(torch.tensor(rises).median())
    print(
        f"second-copy loss {base:.3f}; top-3 ablated {top_loss:.3f}; random-3 rises "
        f"{[round(r, 3) for r in rises]} (median {median_rise:.3f}, mean {sum(rises) / len(rises):.3f})"
    )
    assert top_loss - base >= 2 * max(median_rise, 0.0)
    assert top_loss - base > 0.5
