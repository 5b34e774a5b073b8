"""Exact path patching (interp.patching.paths) against an independent plain-hook reference.

Tiny Llama (grouped-query attention), Qwen2 (q/k/v biases) and Gemma 3 (post-attention and
post-feedforward norms, QK-norm, sliding windows) in float64: every (sender, receiver) pair of a
small graph, in both modes, equals tests/unit/path_reference.py to 1e-8, and the identities of
path patching hold.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from circuits.data.conflicts import ConflictItem
from circuits.methods.direct_path import head_effects
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.patching.edges import Receiver, Sender, parse_edge, parse_receiver, parse_sender, senders_before
from interp.patching.metrics import LogitDiff, LogProb
from interp.patching.pairs import PairRuns, encode_pair, pair_runs
from interp.patching.paths import Mode, path_patch
from tests.tiny import loaded, tiny_gemma3, tiny_gpt2, tiny_llama, tiny_qwen2
from tests.unit.path_reference import PlainRef

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}
TARGET = [7, 9]
TOL = 1e-8


def _pair(seed: int = 1, n: int = 2, p: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, 128, (n, p), generator=g)
    clean[:, 0] = 0
    corrupt = clean.clone()
    corrupt[:, 2:7] = torch.randint(4, 128, (n, 5), generator=g)
    return clean, corrupt


def _models(family: str, backend: str = "bridge") -> tuple[LoadedModel, PlainRef]:
    hf = FAMILIES[family]().double()
    return loaded(copy.deepcopy(hf), backend), PlainRef(copy.deepcopy(hf), TARGET)


def _as_tuple(s: Sender) -> tuple:
    return ("embed",) if s.kind == "embed" else (s.kind, s.layer) if s.kind == "mlp" else ("head", s.layer, s.head)


def _receiver_tuple(r: Receiver) -> tuple:
    if r.kind == "logits":
        return ("logits",)
    return ("mlp", r.layer) if r.kind == "mlp" else (r.kind, r.layer, r.head)


def _small_graph(model: LoadedModel) -> tuple[list[Sender], list[Receiver]]:
    kv = model.info.n_kv_heads - 1
    senders = [parse_sender(s) for s in ("embed", "0.0", "0.3", "mlp:0", "1.1", "1.2", "mlp:1")]
    receivers = [parse_receiver(r) for r in
                 ("q:2.1", "k:2.0", f"v:2.{kv}", "kq:2.1", "vq:2.3", "mlp:1", "mlp:2", "logits")]
    return senders, receivers


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request: pytest.FixtureRequest) -> tuple[LoadedModel, PlainRef, PairRuns, dict, dict]:
    model, ref = _models(request.param)
    clean, corrupt = _pair()
    runs = pair_runs(model, clean, corrupt, LogProb(TARGET))
    return model, ref, runs, ref.run(clean), ref.run(corrupt)


@pytest.mark.parametrize("mode", ["direct", "frozen"])
def test_every_pair_equals_plain_hooks(setup: Any, mode: Mode) -> None:
    model, ref, runs, rec_clean, rec_corrupt = setup
    assert (rec_clean["metric"] - runs.clean_metric).abs().max() < TOL
    senders, receivers = _small_graph(model)
    reference = ref.direct if mode == "direct" else ref.frozen
    checked, largest = 0, 0.0
    for r in receivers:
        ok = [s for s in senders if s.writes_at < r.reads_at]
        # A chunk of two blocks: the batch is split and every block still lands in its rows.
        got = path_patch(model, runs, ok, [r], mode=mode, max_blocks=2)
        assert got.stats["chunks"] >= (len(ok) + 1) // 2
        for i, s in enumerate(ok):
            want = reference(runs.clean_tokens, rec_clean, rec_corrupt, [_as_tuple(s)], _receiver_tuple(r))
            assert (got.values[i] - want).abs().max() < TOL, f"{s.name}->{r.name} ({mode})"
            largest = max(largest, float((want - runs.clean_metric).abs().max()))
            checked += 1
    assert checked >= 40
    # The edges move the metric far beyond the tolerance, so the comparison can fail.
    assert largest > 1e-2


@pytest.mark.parametrize("receiver", ["q:2.1", "k:1.0", "mlp:1", "logits", "vq:2.2"])
def test_all_senders_together_equal_patching_the_receiver_input(setup: Any, receiver: str) -> None:
    """Every sender below a receiver (embed included), patched together in direct mode, is the
    receiver reading the corrupt run's input; under Gemma's post-attention norm too, because a
    layer's heads go through the norm together."""
    model, ref, runs, _, rec_corrupt = setup
    r = parse_receiver(receiver)
    block = senders_before(model.info, [r])
    got = path_patch(model, runs, [block], [r])
    rt = _receiver_tuple(r)
    corrupt_input = ref.input_of(rec_corrupt, rt)
    want = ref.edited(runs.clean_tokens, rt, lambda x: corrupt_input)
    assert (got.values[0] - want).abs().max() < TOL
    assert float((want - runs.clean_metric).abs().max()) > 1e3 * TOL
    if r.kind == "logits":
        assert (got.values[0] - runs.corrupt_metric).abs().max() < TOL


def test_sender_at_or_after_its_receiver_is_refused_and_has_no_path(setup: Any) -> None:
    """Refused with one line; the reference shows why: in the frozen first pass a head of the
    receiver's own layer leaves the receiver's input as it was."""
    model, ref, runs, rec_clean, rec_corrupt = setup
    for sender, receiver in [("2.0", "q:2.1"), ("mlp:1", "mlp:1"), ("mlp:1", "k:1.0"), ("2.3", "mlp:1")]:
        with pytest.raises(UserError, match="at or before its sender") as err:
            path_patch(model, runs, [sender], [receiver])
        assert "\n" not in str(err.value)
    step1 = ref.frozen_inputs(runs.clean_tokens, rec_clean, rec_corrupt, [("head", 2, 0)])
    assert torch.equal(step1["pre"][2], rec_clean["pre"][2])
    assert not torch.equal(step1["final"], rec_clean["final"])


@pytest.mark.parametrize("mode", ["direct", "frozen"])
@pytest.mark.parametrize("kind", ["k", "v"])
def test_ungrouped_over_a_group_equals_the_grouped_edge(setup: Any, mode: Mode, kind: str) -> None:
    model, _, runs, _, _ = setup
    info = model.info
    blocks = ["embed", "0.1", "mlp:0", "1.2"]
    for g in range(info.n_kv_heads):
        grouped = path_patch(model, runs, blocks, [f"{kind}:2.{g}"], mode=mode)
        heads = range(g * info.group_size, (g + 1) * info.group_size)
        ungrouped = path_patch(model, runs, blocks, [f"{kind}q:2.{h}" for h in heads], mode=mode)
        assert (grouped.values - ungrouped.values).abs().max() < 1e-10
        one = path_patch(model, runs, blocks, [f"{kind}q:2.{heads[0]}"], mode=mode)
        # One query head alone is a different question (the model cannot ask it).
        assert (one.values - grouped.values).abs().max() > 1e-6


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_head_to_logits_direct_equals_conflict_heads_direct_path(family: str) -> None:
    """conflict-heads patches a head's output at the final position from the no-conflict run
    into the conflict run and reads the logits through the recomputed final norm (and through
    Gemma's post-attention norm exactly); here the conflict run is the clean prompt and the
    no-conflict run the corrupt one. direct_path computes in float32, hence the tolerance."""
    hf = FAMILIES[family]().double()
    model = loaded(copy.deepcopy(hf), "bridge")
    clean_text, corrupt_text = "w5 w6 w40 w41 w42 w9 w10", "w5 w6 w70 w71 w72 w9 w10"

    class Pair(ConflictItem):
        def conflict_prompt(self, fmt: str) -> str:
            return clean_text

        def plain_prompt(self, fmt: str) -> str:
            return corrupt_text

    item = Pair("pair", "w5", "r", "t", "w5", "w7", "w8", 7, 8, 1, 1)
    table = head_effects(model, [item], "restated").set_index(["layer", "head"])
    clean, corrupt = encode_pair(model, clean_text, corrupt_text)
    runs = pair_runs(model, clean, corrupt, LogitDiff([7], [8]))
    heads = [Sender("head", layer, h) for layer in range(model.info.n_layers) for h in range(model.info.n_heads)]
    got = path_patch(model, runs, heads, ["logits"]).effect()
    want = torch.tensor([float(table.loc[(s.layer, s.head), "path_delta"]) for s in heads], dtype=torch.float64)
    assert (got - want).abs().max() < 2e-5
    assert float(want.abs().max()) > 1e-2


def test_backends_and_chunking_agree() -> None:
    hf = tiny_llama().double()
    clean, corrupt = _pair(seed=3)
    out = {}
    modes: tuple[Mode, ...] = ("direct", "frozen")
    for backend in ("bridge", "nnsight"):
        model = loaded(copy.deepcopy(hf), backend)
        runs = pair_runs(model, clean, corrupt, LogProb(TARGET))
        for mode in modes:
            blocks = ["embed", "0.0", "0.2", "mlp:0", ("0.1", "mlp:0", "embed"), "1.3"]
            out[(backend, mode)] = path_patch(model, runs, blocks, ["q:2.0", "kq:2.3", "mlp:2", "logits"], mode=mode)
            one = path_patch(model, runs, blocks, ["q:2.0", "kq:2.3", "mlp:2", "logits"], mode=mode, max_blocks=1)
            assert one.stats["chunks"] == len(blocks) if mode == "direct" else one.stats["chunks"] >= 2
            assert (one.values - out[(backend, mode)].values).abs().max() < 1e-12
    for mode in modes:
        assert (out[("bridge", mode)].values - out[("nnsight", mode)].values).abs().max() < 1e-12
    assert out[("bridge", "direct")].stats["entry_layer"] == 2


def test_gpt2_runs_and_its_identities_hold() -> None:
    """GPT-2 (fused qkv, Conv1D, LayerNorm, position embeddings inside ``embed``): every sender
    into the logits together gives the corrupt run's metric; the two backends agree."""
    hf = tiny_gpt2().double()
    clean, corrupt = _pair(seed=5)
    values = {}
    for backend in ("bridge", "nnsight"):
        model = loaded(copy.deepcopy(hf), backend)
        runs = pair_runs(model, clean, corrupt, LogProb(TARGET))
        every = senders_before(model.info, [Receiver("logits")])
        res = path_patch(model, runs, [every, "0.1", "mlp:1"], ["logits"])
        assert (res.values[0] - runs.corrupt_metric).abs().max() < 1e-10
        values[backend] = path_patch(model, runs, ["embed", "0.1", "mlp:0", "1.3"], ["q:2.2", "kq:2.1", "mlp:2"]).values
    assert (values["bridge"] - values["nnsight"]).abs().max() < 1e-12


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["q:1", "x:1.2", "k:1.2.3", "12", "mlp:", "mlp:a", "logit", "", "q:-1.0", "kq1.0"])
def test_malformed_receiver_names_are_one_line_errors(name: str) -> None:
    with pytest.raises(UserError) as err:
        parse_receiver(name)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["q:1.2", "1", "1.2.3", "mlp1", "head:1.2", "logits", "emb"])
def test_malformed_sender_names_are_one_line_errors(name: str) -> None:
    with pytest.raises(UserError) as err:
        parse_sender(name)
    assert "\n" not in str(err.value)


def test_edges_check_order_without_a_model_and_shape_with_one() -> None:
    assert parse_edge("0.1->k:1.0").name == "0.1->k:1.0"
    assert parse_edge("1.3->mlp:1").receiver == Receiver("mlp", 1)
    assert parse_edge("0.1->k:1.3", ungrouped=True).receiver == Receiver("kq", 1, 3)
    for bad in ["1.0->q:1.0", "mlp:1->mlp:1", "mlp:1->v:1.0", "2.1->mlp:1", "0.1 k:1.0"]:
        with pytest.raises(UserError) as err:
            parse_edge(bad)
        assert "\n" not in str(err.value)
    info = loaded(tiny_llama()).info  # 3 layers, 4 query heads on 2 kv heads
    with pytest.raises(UserError, match=r"kv head 2 out of range.*kq:1\.2"):
        parse_receiver("k:1.2").check(info)
    parse_receiver("kq:1.2").check(info)
    for bad in ["q:1.4", "vq:0.4", "mlp:3", "q:3.0"]:
        with pytest.raises(UserError):
            parse_receiver(bad).check(info)
    for bad in ["3.0", "0.4", "mlp:3"]:
        with pytest.raises(UserError):
            parse_sender(bad).check(info)


def test_bad_calls_are_one_line_errors() -> None:
    model = loaded(tiny_llama().double())
    with pytest.raises(UserError, match="differ in token length"):
        encode_pair(model, ["w5 w6 w7"], ["w5 w6"])
    with pytest.raises(UserError, match="corrupt prompts"):
        encode_pair(model, ["w5 w6", "w5 w7"], ["w8 w9"])
    clean, corrupt = _pair()
    with pytest.raises(UserError, match="differ in shape"):
        pair_runs(model, clean, corrupt[:, :-1], LogProb(TARGET))
    runs = pair_runs(model, clean, corrupt, LogProb(TARGET))
    for kwargs in [{"senders": ["0.1"], "receivers": ["k:1.2"]}, {"senders": ["1.1"], "receivers": ["q:1.0"]},
                   {"senders": ["0.9"], "receivers": ["q:1.0"]}, {"senders": [], "receivers": ["q:1.0"]},
                   {"senders": ["0.1"], "receivers": []}, {"senders": ["0.1"], "receivers": ["q:1.0", "q:1.0"]}]:
        with pytest.raises(UserError) as err:
            path_patch(model, runs, kwargs["senders"], kwargs["receivers"])
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown path-patching mode"):
        path_patch(model, runs, ["0.1"], ["q:1.0"], mode="linear")  # type: ignore[arg-type]
