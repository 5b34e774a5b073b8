"""Edge attribution (EAP, EAP-IG), exact confirmation, circuits and faithfulness against the
plain-hook reference of tests/unit/path_reference.py (tiny float64 models)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from interp.errors import UserError
from interp.model.layout import ModelInfo
from interp.patching.attribution import spearman
from interp.patching.edge_attribution import confirm_edges, edge_attribution, exact_edge_values
from interp.patching.edges import (
    Edge,
    Graph,
    all_receivers,
    full_graph,
    parse_edge,
    parse_receiver,
    parse_sender,
)
from interp.patching.faithfulness import (
    build_circuit,
    circuit_values,
    connected_to_logits,
    faithfulness,
    fed_from_embed,
    on_paths,
    random_circuits,
)
from interp.patching.intervals import faithfulness_interval
from interp.patching.metrics import LogProb
from interp.patching.pairs import pair_runs
from interp.patching.paths import path_patch
from tests.tiny import loaded, tiny_llama
from tests.unit.path_reference import PlainRef
from tests.unit.test_paths import FAMILIES, TARGET, _as_tuple, _pair, _receiver_tuple

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# HF's eager attention softmax and Llama's RMSNorm compute in float32 even in a float64 model,
# so gradients through them agree to float32 precision relative to the largest score.
REL = 1e-6


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request: pytest.FixtureRequest) -> tuple[Any, PlainRef, Any, dict, dict]:
    hf = FAMILIES[request.param]().double()
    model = loaded(copy.deepcopy(hf))
    ref = PlainRef(copy.deepcopy(hf), TARGET)
    clean, corrupt = _pair()
    runs = pair_runs(model, clean, corrupt, LogProb(TARGET))
    return model, ref, runs, ref.run(clean), ref.run(corrupt)


def _sample(edges: tuple[Edge, ...], k: int) -> list[Edge]:
    """Every kind of sender and receiver, then a seeded sample."""
    chosen: dict[tuple[str, str], Edge] = {}
    for e in edges:
        chosen.setdefault((e.sender.kind, e.receiver.kind), e)
    rest = [e for e in edges if e not in chosen.values()]
    idx = torch.randperm(len(rest), generator=torch.Generator().manual_seed(0))[:k].tolist()
    return list(chosen.values()) + [rest[i] for i in idx]


@pytest.mark.parametrize(("method", "steps"), [("eap", 0), ("eap-ig", 3)])
def test_scores_equal_autograd_on_the_plain_model(setup: Any, method: str, steps: int) -> None:
    """EAP: (corrupt - clean sender output) . d metric / d receiver input at the clean run;
    EAP-IG: the gradient averaged over clean + k/m (corrupt - clean) at layer 0's input,
    k = 1..m. The reference differentiates a plain HF run with respect to a per-prompt scale
    of the sender's change added to the receiver's input."""
    model, ref, runs, rec_clean, rec_corrupt = setup
    graph = full_graph(model.info)
    scores = edge_attribution(model, runs, graph, method=method, steps=steps)  # type: ignore[arg-type]
    assert scores.edges == graph.edges
    assert scores.values.shape == (len(graph.edges), runs.n_prompts)
    index = {e: i for i, e in enumerate(scores.edges)}
    alphas = [0.0] if method == "eap" else [k / steps for k in range(1, steps + 1)]
    largest = float(scores.values.abs().max())
    for e in _sample(scores.edges, 20):
        delta = ref.change(rec_clean, rec_corrupt, [_as_tuple(e.sender)])
        want = sum(ref.slope(runs.clean_tokens, _receiver_tuple(e.receiver), delta,
                             rec_clean["pre"][0] + a * (rec_corrupt["pre"][0] - rec_clean["pre"][0]))
                   for a in alphas) / len(alphas)
        assert (scores.values[index[e]] - want).abs().max() < REL * largest, e.name
    assert largest > 1e-2


def test_confirmation_runs_the_top_edges_exactly(setup: Any) -> None:
    model, _, runs, _, _ = setup
    scores = edge_attribution(model, runs, method="eap-ig", steps=2)
    conf = confirm_edges(model, runs, scores, top_n=12, mode="frozen")
    top = scores.scores.abs().topk(12).indices.tolist()
    assert list(conf.edges) == [scores.edges[i] for i in top]
    e = conf.edges[3]
    alone = path_patch(model, runs, [e.sender], [e.receiver], mode="frozen")
    assert (conf.exact_values[3] - alone.values[0]).abs().max() < 1e-12
    assert conf.spearman == pytest.approx(spearman(conf.estimate, conf.exact))
    assert torch.equal(exact_edge_values(model, runs, conf.edges, mode="frozen"), conf.exact_values)


def test_circuit_runs_equal_plain_hooks(setup: Any) -> None:
    """A circuit run: every edge outside the circuit carries the corrupt value, kept edges the
    live one; full = clean and empty = corrupt exactly."""
    model, ref, runs, rec_clean, rec_corrupt = setup
    graph = full_graph(model.info)
    info = model.info
    circuits = [graph.edges, (), *random_circuits(graph, info, 12, 2, seed=1),
                *random_circuits(graph, info, 30, 1, seed=2, baseline="uniform"), graph.edges[:60]]
    got = circuit_values(model, runs, circuits, graph, budget_bytes=1)  # one circuit per pass
    assert (got[0] - runs.clean_metric).abs().max() < 1e-10
    assert (got[1] - runs.corrupt_metric).abs().max() < 1e-10
    moved = 0.0
    for c, circuit in enumerate(circuits[2:], start=2):
        kept = {(_as_tuple(e.sender), _receiver_tuple(e.receiver)) for e in circuit}
        want = ref.circuit(runs.clean_tokens, rec_clean, rec_corrupt, kept)
        assert (got[c] - want).abs().max() < 1e-8
        moved = max(moved, float((want - runs.corrupt_metric).abs().max()))
    assert moved > 1e-3


def _info() -> ModelInfo:
    return ModelInfo("x", n_layers=3, n_heads=4, n_kv_heads=2, d_head=16, d_model=64, vocab_size=128,
                     max_positions=64, d_mlp=128)


def test_pruning_keeps_paths_from_embed_to_the_logits() -> None:
    e = [parse_edge(x) for x in (
        "embed->q:0.1", "0.1->k:1.1", "1.3->logits",  # k:1.1 feeds heads 1.2 and 1.3 (group 1)
        "0.2->v:2.0",  # 0.2 is fed by nothing, and heads 2.0 and 2.1 send nothing
        "1.0->mlp:1", "mlp:1->logits",  # 1.0 is fed by nothing: not reachable from embed
        "embed->mlp:0",  # mlp 0 sends nothing: dead end
    )]
    info = _info()
    assert set(connected_to_logits(e, info)) == {e[0], e[1], e[2], e[4], e[5]}
    assert set(fed_from_embed(e, info)) == {e[0], e[1], e[2], e[6]}
    assert on_paths(e, info) == (e[0], e[1], e[2])


def test_random_circuits_are_seeded_and_connected() -> None:
    info = _info()
    graph = full_graph(info)
    a = random_circuits(graph, info, 15, 5, seed=3)
    assert a == random_circuits(graph, info, 15, 5, seed=3)
    assert a != random_circuits(graph, info, 15, 5, seed=4)
    for c in a:
        assert len(c) == len(set(c)) == 15
        assert set(connected_to_logits(c, info)) == set(c)
    u = random_circuits(graph, info, 15, 5, seed=3, baseline="uniform")
    assert all(len(set(c)) == 15 for c in u)
    with pytest.raises(UserError, match="larger than the graph"):
        random_circuits(graph, info, len(graph.edges) + 1, 1)


def test_build_circuit_and_faithfulness_by_hand(setup: Any) -> None:
    model, _, runs, _, _ = setup
    scores = edge_attribution(model, runs, method="eap")
    conf = confirm_edges(model, runs, scores, top_n=60)
    gap = float((runs.clean_metric - runs.corrupt_metric).mean())
    circuit = build_circuit(conf, model.info, rel_threshold=0.01)
    assert circuit.threshold == pytest.approx(0.01 * abs(gap))
    expected = on_paths([e for i, e in enumerate(conf.edges) if abs(float(conf.exact[i])) >= circuit.threshold],
                        model.info)
    assert circuit.edges == expected
    assert circuit.edges
    f = faithfulness(model, runs, circuit, draws=6, seed=1)
    per_prompt = circuit_values(model, runs, [circuit.edges])[0]
    m_c = float(per_prompt.mean())
    full, empty = float(runs.clean_metric.mean()), float(runs.corrupt_metric.mean())
    assert f.value == pytest.approx((m_c - empty) / (full - empty), abs=1e-10)
    # Its interval: the bootstrap over these prompts' (m(C), m(clean), m(corrupt)), seeded as the
    # random circuits (test_path_intervals.py checks the function against scipy).
    assert torch.allclose(f.per_prompt, per_prompt, atol=1e-10)
    iv = faithfulness_interval(per_prompt, runs.clean_metric, runs.corrupt_metric, seed=1)
    assert (f.interval.value, f.interval.n) == (pytest.approx(f.value, abs=1e-10), runs.n_prompts)
    assert (f.interval.lo, f.interval.hi) == pytest.approx((iv.lo, iv.hi), abs=1e-8)
    rand = random_circuits(full_graph(model.info), model.info, len(circuit.edges), 6, seed=1)
    r_vals = (circuit_values(model, runs, rand).mean(dim=1) - empty) / (full - empty)
    assert torch.allclose(f.random, r_vals, atol=1e-10)
    assert f.percentile == pytest.approx(100 * (float((r_vals < f.value).sum()) + 0.5 * float((r_vals == f.value).sum())) / 6)


def test_bad_input_is_one_line() -> None:
    model = loaded(tiny_llama().double())
    clean, corrupt = _pair()
    runs = pair_runs(model, clean, corrupt, LogProb(TARGET))
    ungrouped = Graph((parse_sender("embed"),), (parse_receiver("kq:1.1"),))
    calls = [
        lambda: edge_attribution(model, runs, method="eap-x"),  # type: ignore[arg-type]
        lambda: edge_attribution(model, runs, method="eap-ig", steps=0),
        lambda: edge_attribution(model, runs, ungrouped),
        lambda: edge_attribution(model, runs, Graph((parse_sender("2.1"),), (parse_receiver("q:1.0"),))),
        lambda: edge_attribution(model, runs, Graph((parse_sender("embed"),), (parse_receiver("k:1.5"),))),
        lambda: confirm_edges(model, runs, edge_attribution(model, runs, method="eap"), top_n=0),
        lambda: circuit_values(model, runs, [(parse_edge("embed->q:1.0"),)],
                               Graph((parse_sender("embed"),), all_receivers(model.info)[:3])),
    ]
    for call in calls:
        with pytest.raises(UserError) as err:
            call()
        assert "\n" not in str(err.value)
    same = pair_runs(model, clean, clean, LogProb(TARGET))
    circuit = build_circuit(confirm_edges(model, runs, edge_attribution(model, runs, method="eap"), top_n=5),
                            model.info, threshold=0.0)
    with pytest.raises(UserError, match="same metric"):
        faithfulness(model, same, circuit)
    with pytest.raises(UserError, match="draws"):
        faithfulness(model, runs, circuit, draws=0)


def test_backends_agree_on_scores_and_circuit_runs() -> None:
    """nnsight has no run_from_layer: its passes start from the tokens and patch the entry
    residual in; gradients flow through its edits as through the bridge's hooks."""
    hf = FAMILIES["gemma3"]().double()
    clean, corrupt = _pair(seed=2)
    out = {}
    for backend in ("bridge", "nnsight"):
        model = loaded(copy.deepcopy(hf), backend)
        runs = pair_runs(model, clean, corrupt, LogProb(TARGET))
        graph = full_graph(model.info)
        scores = edge_attribution(model, runs, graph, method="eap-ig", steps=2)
        circuits = circuit_values(model, runs, [graph.edges[:40], graph.edges[::3]], graph)
        out[backend] = (scores.values, circuits)
    assert (out["bridge"][0] - out["nnsight"][0]).abs().max() < 1e-10
    assert (out["bridge"][1] - out["nnsight"][1]).abs().max() < 1e-10
