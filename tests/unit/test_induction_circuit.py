"""Path patching finds the induction circuit of a 2-layer attention-only model trained here.

The model is ``tests/trained_induction.py``'s (a Llama-style attention-only model trained on
repeated random tokens). Olsson et al. (2022) predict K-composition: a layer-0 head that
attends to the previous token writes it into each position, and the induction head's keys
read it there. The previous-token and induction heads are found from the attention patterns
of the plain HF model, then:

- among the edges into the induction head's key (its kv head), exact path patching (both
  modes) ranks the previous-token head first;
- EAP-IG, confirmed exactly, gives a circuit (edges moving the metric by >= 5% of the
  clean-corrupt gap, on paths from embed to the logits) whose faithfulness recovers most of
  that gap, above every one of 20 random circuits of its size.

The metric is the logit difference answer - the corrupt prompt's answer (Wang et al. 2022).
The log-probability saturates here: the model gives its answer p ~ 0.998 through four
redundant induction heads, so one edge moves it by ~0.02 (the 5% circuit comes out empty and
the ranking into a key drowns in that); the logit difference is additive over heads.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from interp.patching.edge_attribution import confirm_edges, edge_attribution
from interp.patching.edges import Receiver, full_graph, senders_before
from interp.patching.faithfulness import build_circuit, faithfulness
from interp.patching.metrics import LogitDiff
from interp.patching.pairs import pair_runs
from interp.patching.paths import path_patch
from tests.tiny import VOCAB, loaded
from tests.trained_induction import find_heads, train_induction_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # trains a model (seconds); the full suite runs it


@pytest.fixture(scope="module")
def trained() -> tuple[LlamaForCausalLM, float]:
    return train_induction_model()


def _prompts(n: int = 8, period: int = 9) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Clean: BOS x x[:-1] (the answer x[-1] follows by induction); corrupt: BOS y x[:-1]."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(4, VOCAB, (n, period), generator=gen)
    y = torch.randint(4, VOCAB, (n, period), generator=gen)
    bos = torch.zeros(n, 1, dtype=torch.long)
    return (torch.cat([bos, x, x[:, :-1]], 1), torch.cat([bos, y, x[:, :-1]], 1), x[:, -1].tolist(),
            y[:, -1].tolist())


def _heads(hf: LlamaForCausalLM, clean: torch.Tensor, period: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """From the plain model's attention: the layer-0 head attending most to the previous token,
    and the layer-1 head attending most, from the last position, to the token after the
    previous occurrence of the last token (position ``period``)."""
    with torch.no_grad():
        att = hf(clean, output_attentions=True).attentions
    prev = att[0].diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))
    induction = att[1][:, :, -1, period].mean(dim=0)
    return int(prev.argmax()), int(induction.argmax()), prev, induction


def test_previous_token_head_writes_the_induction_heads_key_and_the_circuit_is_faithful(
    trained: tuple[LlamaForCausalLM, float],
) -> None:
    hf, loss = trained
    assert loss < 0.5, f"training did not reach induction (loss {loss:.3f})"
    clean, corrupt, answer, other = _prompts()
    prev, ind, prev_scores, ind_scores = find_heads(hf, clean, 9)
    assert float(prev_scores[prev]) > 0.5
    assert float(ind_scores[ind]) > 0.5
    model = loaded(copy.deepcopy(hf).double())
    runs = pair_runs(model, clean, corrupt, LogitDiff(answer, other))
    key = Receiver("k", 1, ind // model.info.group_size)
    senders = senders_before(model.info, [key], kinds=("embed", "head"))
    for mode in ("direct", "frozen"):
        effects = path_patch(model, runs, senders, [key], mode=mode).effect()  # type: ignore[arg-type]
        ranked = [senders[i].name for i in effects.abs().argsort(descending=True).tolist()]
        print(f"{mode}: edges into {key.name}, by |effect|:",
              ", ".join(f"{senders[i].name} {float(effects[i]):+.3f}" for i in effects.abs().argsort(descending=True)))
        assert ranked[0] == f"0.{prev}", ranked

    graph = full_graph(model.info, mlps=False)
    scores = edge_attribution(model, runs, graph, method="eap-ig", steps=5)
    confirmed = confirm_edges(model, runs, scores, top_n=200)
    circuit = build_circuit(confirmed, model.info)
    result = faithfulness(model, runs, circuit, graph, draws=20)
    print(f"circuit ({len(circuit.edges)} of {len(graph.edges)} edges): {', '.join(circuit.names())}")
    print(f"faithfulness {result.value:.3f}, percentile {result.percentile:.0f} of 20 random circuits "
          f"(max {float(result.random.max()):.3f}); EAP-IG vs exact Spearman {confirmed.spearman:.3f}")
    assert f"0.{prev}->{key.name}" in circuit.names()
    assert result.value > 0.5
    assert result.percentile == 100.0
