"""The patching engine against a naive loop: one unbatched ``model.run`` per swept site, with
interventions written by hand, full logits and the metric computed here with plain indexing.
The engine's stacking, chunking, prefix reuse and logits_to_keep must not change a number.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from interp.errors import UserError
from interp.model.interventions import AblateHeads, AddNoise, Intervention, Knockout, Patch
from interp.model.loaded import LoadedModel
from interp.patching.attribution import attribution_patch, estimate_then_confirm, spearman, top_k_overlap
from interp.patching.execution import run_sweep
from interp.patching.memory import bytes_per_row
from interp.patching.metrics import LogitDiff, Prob
from interp.patching.planning import plan_chunks
from interp.patching.sweeps import Sweep
from tests.tiny import loaded

N_PROMPTS, SEQ = 3, 7
CORRECT, WRONG = (5, 6, 7), (8, 9, 10)


@pytest.fixture
def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "tokens": torch.randint(4, 128, (N_PROMPTS, SEQ), generator=g),
        "source": torch.randint(4, 128, (N_PROMPTS, SEQ), generator=g),
    }


def metric_of(logits: torch.Tensor) -> torch.Tensor:
    last = logits[:, -1, :]
    return last[torch.arange(N_PROMPTS), list(CORRECT)] - last[torch.arange(N_PROMPTS), list(WRONG)]


def naive(model: LoadedModel, tokens: torch.Tensor, edits: list[Intervention], sources: dict) -> torch.Tensor:
    return metric_of(model.run(tokens, interventions=edits, sources=sources).logits).double()


def window(layer: int, w: int, n: int) -> range:
    # ROME: layers [L - w//2, L + ceil(w/2)) clipped to the model.
    return range(max(0, layer - w // 2), min(n, layer + (w + 1) // 2))


def reference_loop(model: LoadedModel, sweep: Sweep, tokens: torch.Tensor, ref: torch.Tensor) -> list[tuple[dict, torch.Tensor]]:
    """Labels and metric values, site by site, without the engine."""
    info = model.info
    n_layers, n_heads = info.n_layers, info.n_heads
    site = sweep.site or {"heads": "z", "layers": "resid_pre", "positions": "resid_pre", "windows": "mlp_out"}[sweep.over]
    kind = sweep.intervention
    ref_cache = model.run(ref, cache=[] if kind == "knockout" else [f"{site}.*"]).cache
    zero = {k: torch.zeros_like(v[:1]) for k, v in ref_cache.items()}
    mean = {k: v.mean(dim=(0, 1), keepdim=True).expand_as(v[:1]).clone() for k, v in ref_cache.items()}
    sources = {"ref": ref_cache, "zero": zero, "mean": mean}
    positions = sweep.positions

    def edit(layer: int, heads: tuple[int, ...] | None, pos: tuple[int, ...] | None) -> Intervention:
        if kind == "knockout":
            return Knockout(layer, query_positions=(SEQ - 1,), key_positions=pos, heads=heads)
        if site == "z" and kind in ("zero", "mean", "resample"):
            return AblateHeads(layer, heads=heads if heads is not None else tuple(range(n_heads)), method=kind,
                               source=None if kind == "zero" else "ref", positions=pos)
        src = {"patch": "ref", "resample": "ref", "zero": "zero", "mean": "mean"}[kind]
        return Patch(f"{site}.{layer}", source=src, heads=heads, positions=pos)

    out = []
    if sweep.over == "heads":
        for layer in range(n_layers):
            for h in range(n_heads):
                out.append(({"layer": layer, "head": h}, naive(model, tokens, [edit(layer, (h,), positions)], sources)))
    elif sweep.over == "layers":
        for layer in range(n_layers):
            out.append(({"layer": layer}, naive(model, tokens, [edit(layer, sweep.heads, positions)], sources)))
    else:
        for layer in range(n_layers):
            layers = window(layer, sweep.window, n_layers) if sweep.over == "windows" else [layer]
            for p in positions if positions is not None else range(SEQ):
                edits = [edit(w, sweep.heads, (p,)) for w in layers]
                out.append(({"layer": layer, "position": p}, naive(model, tokens, edits, sources)))
    return out


SWEEPS = [
    Sweep("heads", "patch"),
    Sweep("heads", "zero"),
    Sweep("heads", "mean"),
    Sweep("heads", "resample"),
    Sweep("heads", "patch", positions=(2, 6)),
    Sweep("heads", "knockout", positions=(0, 3)),
    Sweep("layers", "patch"),
    Sweep("layers", "zero", site="attn_out"),
    Sweep("layers", "mean", site="mlp_out"),
    Sweep("layers", "resample", site="resid_post", positions=(1, 4)),
    Sweep("layers", "knockout", positions=(0, 2)),
    Sweep("layers", "zero", site="z", heads=(0, 2)),
    Sweep("positions", "patch", positions=(1, 5)),
    Sweep("positions", "mean", site="attn_out", positions=(3, 6)),
    Sweep("positions", "knockout", positions=(0, 5)),
    Sweep("windows", "patch", window=2, positions=(0, 4)),
    Sweep("windows", "zero", site="attn_out", window=3, positions=(2, 5)),
    Sweep("windows", "knockout", window=2, positions=(1, 4)),
]


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda s: f"{s.over}-{s.intervention}-{s.site}")
def test_engine_equals_naive_loop(tiny_model: LoadedModel, data: dict[str, torch.Tensor], sweep: Sweep) -> None:
    tokens, ref = data["tokens"], data["source"]
    expected = reference_loop(tiny_model, sweep, tokens, ref)
    metric = LogitDiff(CORRECT, WRONG)
    base = metric_of(tiny_model.run(tokens).logits).double()
    want = torch.stack([v for _, v in expected])
    # Prefix reuse with chunks that split start-layer groups unevenly, and plain full forwards
    # in one chunk: both must give the loop's numbers.
    runs: list[dict[str, Any]] = [{"prefix_reuse": True, "max_cases": 5}, {"prefix_reuse": False}]
    for kwargs in runs:
        res = run_sweep(tiny_model, sweep, metric, tokens, ref, **kwargs)
        assert res.labels == [lab for lab, _ in expected]
        torch.testing.assert_close(res.values, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.base, base, atol=1e-5, rtol=1e-5)
        assert res.intervention == sweep.intervention
    # The edits must matter, or equality above would prove nothing.
    assert (want - base).abs().max() > 1e-3


def test_prefix_reuse_skips_layers_and_leaves_the_model_clean(tiny_model: LoadedModel, data: dict[str, torch.Tensor]) -> None:
    tokens, ref = data["tokens"], data["source"]
    before = tiny_model.run(tokens).logits
    metric = LogitDiff(CORRECT, WRONG)
    fast = run_sweep(tiny_model, Sweep("heads"), metric, tokens, ref, max_cases=3)
    slow = run_sweep(tiny_model, Sweep("heads"), metric, tokens, ref, prefix_reuse=False, max_cases=3)
    assert fast.stats["prefix_reuse"]
    assert fast.stats["prefix_check_diff"] == pytest.approx(0.0, abs=1e-5)
    assert fast.stats["token_layers"] < slow.stats["token_layers"]
    assert max(fast.stats["chunk_sizes"]) == 3
    torch.testing.assert_close(fast.values, slow.values, atol=1e-5, rtol=1e-5)
    bridge = tiny_model.backend.bridge  # type: ignore[attr-defined]
    assert all("forward" not in b.__dict__ for b in bridge.blocks)
    torch.testing.assert_close(tiny_model.run(tokens).logits, before)


def cuttable_cache(model: LoadedModel) -> bool:
    """Whether the model's KV cache can be cut at a position: a sliding-window layer's cache
    (Gemma 3) holds only the last window, so the engine must decline sequence reuse there."""
    return "sliding_attention" not in (getattr(model.hf.config, "layer_types", None) or ())


def test_sequence_reuse_computes_only_the_edited_suffix(tiny_model: LoadedModel, data: dict[str, torch.Tensor]) -> None:
    tokens, ref = data["tokens"], data["source"]
    metric = LogitDiff(CORRECT, WRONG)
    sweep = Sweep("positions", "patch", site="resid_post", positions=(2, 3, 6))
    fast = run_sweep(tiny_model, sweep, metric, tokens, ref, max_cases=2)
    no_cut = run_sweep(tiny_model, sweep, metric, tokens, ref, max_cases=2, sequence_reuse=False)
    assert fast.stats["sequence_reuse"] == cuttable_cache(tiny_model)
    assert not no_cut.stats["sequence_reuse"]
    if cuttable_cache(tiny_model):
        assert fast.stats["token_layers"] < no_cut.stats["token_layers"]
    expected = torch.stack([v for _, v in reference_loop(tiny_model, sweep, tokens, ref)])
    torch.testing.assert_close(fast.values, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(no_cut.values, expected, atol=1e-5, rtol=1e-5)


def test_shared_token_prefix_is_not_recomputed(tiny_model: LoadedModel, data: dict[str, torch.Tensor]) -> None:
    """Base and source prompts agree on their first 3 tokens (as a conflict prompt and its
    consistent twin do): patching those positions is a no-op, so the engine starts at 3."""
    tokens = data["tokens"]
    ref = data["source"].clone()
    ref[:, :3] = tokens[:, :3]
    metric = LogitDiff(CORRECT, WRONG)
    for sweep in (Sweep("heads", "patch"), Sweep("layers", "patch", site="resid_post")):
        expected = torch.stack([v for _, v in reference_loop(tiny_model, sweep, tokens, ref)])
        fast = run_sweep(tiny_model, sweep, metric, tokens, ref, max_cases=4)
        slow = run_sweep(tiny_model, sweep, metric, tokens, ref, max_cases=4, sequence_reuse=False)
        assert fast.stats["sequence_reuse"] == cuttable_cache(tiny_model)
        if cuttable_cache(tiny_model):
            assert fast.stats["token_layers"] < slow.stats["token_layers"]
        torch.testing.assert_close(fast.values, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(slow.values, expected, atol=1e-5, rtol=1e-5)
    # Zero ablation changes the shared positions too: nothing may be cut there.
    zero = run_sweep(tiny_model, Sweep("heads", "zero"), metric, tokens, ref)
    torch.testing.assert_close(
        zero.values, torch.stack([v for _, v in reference_loop(tiny_model, Sweep("heads", "zero"), tokens, ref)]),
        atol=1e-5, rtol=1e-5,
    )


NOISE = AddNoise("embed", positions=(1, 2), std=0.5, seed=3)


@pytest.mark.parametrize(
    "sweep",
    [
        Sweep("positions", "patch", site="resid_post", positions=(0, 2, 5)),
        Sweep("windows", "patch", site="mlp_out", window=2, positions=(1, 3, 6)),
        Sweep("windows", "patch", site="attn_out", window=3, positions=(2, 4)),
        Sweep("positions", "patch", site="embed", positions=(1, 4)),
        Sweep("heads", "zero", positions=(3,)),
    ],
    ids=lambda s: f"{s.over}-{s.site}",
)
def test_base_interventions_are_in_every_variant(tiny_model: LoadedModel, data: dict[str, torch.Tensor], sweep: Sweep) -> None:
    """ROME's setting: noise in the base run, clean states restored one site at a time. The
    loop applies the noise and the restoration by hand in one plain run per site."""
    tokens = data["tokens"]
    clean_tokens = data["source"]
    site = sweep.site or "z"
    clean = tiny_model.run(clean_tokens, cache=[f"{site}.*" if site != "embed" else "embed"]).cache
    want, edits = [], sweep.cases(tiny_model, SEQ)
    for v in edits:
        hand = [NOISE] + [
            AblateHeads(iv.layer, heads=iv.heads, method="zero", positions=iv.positions) if isinstance(iv, AblateHeads)
            else Patch(iv.site_name, source="clean", positions=iv.positions)  # type: ignore[attr-defined]
            for iv in v.edits
        ]
        want.append(naive(tiny_model, tokens, hand, {"clean": clean}))
    expected = torch.stack(want)
    noised_base = naive(tiny_model, tokens, [NOISE], {})
    metric = LogitDiff(CORRECT, WRONG)
    for kwargs in ({"max_cases": 4}, {"prefix_reuse": False, "max_cases": 3}):
        res = run_sweep(tiny_model, sweep, metric, tokens, clean, base_interventions=[NOISE], **kwargs)
        torch.testing.assert_close(res.values, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.base, noised_base, atol=1e-5, rtol=1e-5)
    assert (expected - noised_base).abs().max() > 1e-3


def test_prob_metric_is_the_softmax(tiny_model: LoadedModel, data: dict[str, torch.Tensor]) -> None:
    tokens, ref = data["tokens"], data["source"]
    res = run_sweep(tiny_model, Sweep("layers", "patch"), Prob(CORRECT), tokens, ref, select=[1])
    logits = tiny_model.run(tokens, interventions=[Patch("resid_pre.1", source="ref")],
                            sources={"ref": tiny_model.run(ref, cache=["resid_pre.1"]).cache}).logits[:, -1]
    p = torch.exp(logits.double() - torch.logsumexp(logits.double(), dim=-1, keepdim=True))
    torch.testing.assert_close(res.values[0], p[torch.arange(N_PROMPTS), list(CORRECT)], atol=1e-6, rtol=1e-5)


def test_uneven_budget_split(tiny_model: LoadedModel, data: dict[str, torch.Tensor]) -> None:
    tokens, ref = data["tokens"], data["source"]
    metric = LogitDiff(CORRECT, WRONG)
    per_case = N_PROMPTS * bytes_per_row(tiny_model, SEQ, 1)
    # A budget of k cases where k does not divide the number of cases, so chunks must differ.
    k = 4 if SEQ * tiny_model.info.n_layers % 4 else 5
    res = run_sweep(tiny_model, Sweep("positions"), metric, tokens, ref, budget_bytes=k * per_case + 7,
                    prefix_reuse=False)
    assert max(res.stats["chunk_sizes"]) == k
    assert sum(res.stats["chunk_sizes"]) == SEQ * tiny_model.info.n_layers
    assert len(set(res.stats["chunk_sizes"])) > 1
    one = run_sweep(tiny_model, Sweep("positions"), metric, tokens, ref, prefix_reuse=False)
    torch.testing.assert_close(res.values, one.values, atol=1e-5, rtol=1e-5)


def test_budget_smaller_than_one_variant(tiny_model: LoadedModel, data: dict[str, torch.Tensor]) -> None:
    per_case = N_PROMPTS * bytes_per_row(tiny_model, SEQ, 1)
    with pytest.raises(UserError, match="smaller than one patched case"):
        run_sweep(tiny_model, Sweep("heads"), LogitDiff(CORRECT, WRONG), data["tokens"], data["source"],
                  budget_bytes=per_case - 1)


def test_bad_input(tiny_model: LoadedModel, data: dict[str, torch.Tensor]) -> None:
    metric = LogitDiff(CORRECT, WRONG)
    with pytest.raises(UserError, match="needs a source"):
        run_sweep(tiny_model, Sweep("heads"), metric, data["tokens"])
    with pytest.raises(UserError, match="key positions"):
        run_sweep(tiny_model, Sweep("heads", "knockout"), metric, data["tokens"])
    with pytest.raises(UserError, match="per-head site"):
        run_sweep(tiny_model, Sweep("heads", site="resid_pre"), metric, data["tokens"], data["source"])
    with pytest.raises(UserError, match="layer 9 out of range"):
        run_sweep(tiny_model, Sweep("layers", layers=(9,)), metric, data["tokens"], data["source"])
    with pytest.raises(UserError, match="unknown sweep"):
        Sweep("neurons")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="answer tokens"):
        run_sweep(tiny_model, Sweep("heads"), LogitDiff((5,), (6,)), data["tokens"], data["source"])


def test_default_resample_reference_is_rolled_prompts(tiny_model: LoadedModel, data: dict[str, torch.Tensor]) -> None:
    tokens = data["tokens"]
    metric = LogitDiff(CORRECT, WRONG)
    a = run_sweep(tiny_model, Sweep("layers", "resample"), metric, tokens)
    b = run_sweep(tiny_model, Sweep("layers", "resample"), metric, tokens, tokens.roll(1, dims=0))
    torch.testing.assert_close(a.values, b.values)


def test_sweep_round_trips() -> None:
    s = Sweep("windows", "knockout", window=4, positions=(1, 2), query_positions=(-1,))
    assert Sweep.from_dict(s.to_dict()) == s


def test_plan_chunks_prefers_one_start_layer_per_chunk() -> None:
    starts = [0] * 4 + [1] * 4 + [2] * 4
    chunks = plan_chunks(starts, max_cases=8, rows_per_case=16, seq_len=13, n_layers=3, prefix_reuse=True)
    assert [(s, len(i)) for s, i in chunks] == [(0, 4), (1, 4), (2, 4)]
    assert sorted(i for _, idx in chunks for i in idx) == list(range(12))


# ------------------------------------------------------------------ attribution patching


@pytest.fixture(params=["llama", "gpt2"])
def tiny64(request: pytest.FixtureRequest, tiny_llama_hf: torch.nn.Module, tiny_gpt2_hf: torch.nn.Module) -> LoadedModel:
    # float64, so central differences resolve the first-order term well below the tolerance.
    hf = tiny_llama_hf if request.param == "llama" else tiny_gpt2_hf
    return loaded(copy.deepcopy(hf).double(), "bridge")


def test_attribution_matches_central_differences(tiny64: LoadedModel, data: dict[str, torch.Tensor]) -> None:
    if "Llama" in tiny64.name:
        # HF's LlamaRMSNorm computes in float32 even on a float64 model: ~1e-7 relative noise
        # in every forward swamps a tight finite-difference check. GPT-2 is float64 throughout;
        # Llama is covered by the small-edit agreement test below.
        pytest.skip("LlamaRMSNorm runs in float32; finite differences need a float64 forward")
    tokens, src = data["tokens"], data["source"]
    metric = LogitDiff(CORRECT, WRONG)
    att = attribution_patch(tiny64, Sweep("heads"), metric, tokens, src)
    base = tiny64.run(tokens, cache=["z.*"]).cache
    other = tiny64.run(src, cache=["z.*"]).cache
    # Central differences: O(eps^2) truncation, float64 rounding ~1e-16 / eps.
    eps = 1e-4
    i = 0
    for layer in range(tiny64.info.n_layers):
        for h in range(tiny64.info.n_heads):
            s = f"z.{layer}"
            step = {"+": {s: base[s] + eps * (other[s] - base[s])}, "-": {s: base[s] - eps * (other[s] - base[s])}}
            plus = naive_metric(tiny64, tokens, Patch(s, source="+", heads=(h,)), step)
            minus = naive_metric(tiny64, tokens, Patch(s, source="-", heads=(h,)), step)
            fd = (plus - minus) / (2 * eps)
            torch.testing.assert_close(att.estimates[i], fd, atol=1e-8, rtol=1e-5)
            i += 1
    assert att.estimates.abs().max() > 1e-3


def naive_metric(model: LoadedModel, tokens: torch.Tensor, iv: Intervention, sources: dict) -> torch.Tensor:
    return metric_of(model.run(tokens, interventions=[iv], sources=sources).logits).double()


def test_attribution_equals_exact_for_small_edits(tiny64: LoadedModel, data: dict[str, torch.Tensor]) -> None:
    """Patching a source only eps away from the base is linear to first order: estimate and
    exact effect differ by O(eps) relative to the effects, the signs all agree, the top sites
    are the same."""
    tokens, src = data["tokens"], data["source"]
    base = tiny64.run(tokens, cache=["resid_pre.*"]).cache
    other = tiny64.run(src, cache=["resid_pre.*"]).cache
    eps = 1e-3
    near = {k: base[k] + eps * (other[k] - base[k]) for k in base}
    conf = estimate_then_confirm(tiny64, Sweep("positions"), LogitDiff(CORRECT, WRONG), tokens, near,
                                 top_k=5, confirm="all")
    exact = conf.exact.effect()
    est = conf.attribution.mean()
    assert exact.abs().max() > 1e-6
    assert float((est - exact).abs().max()) < 0.05 * float(exact.abs().max())
    assert conf.sign_agreement == 1.0
    assert conf.top_k_overlap == 1.0


def test_estimate_then_confirm_top(tiny_model: LoadedModel, data: dict[str, torch.Tensor]) -> None:
    conf = estimate_then_confirm(tiny_model, Sweep("heads"), LogitDiff(CORRECT, WRONG), data["tokens"],
                                 data["source"], top_k=4)
    est = conf.attribution.mean()
    assert conf.confirmed == est.abs().topk(4).indices.tolist()
    assert conf.spearman_all is None
    assert -1.0 <= conf.spearman_confirmed <= 1.0
    with pytest.raises(UserError, match="knockout"):
        attribution_patch(tiny_model, Sweep("layers", "knockout", positions=(0,)), LogitDiff(CORRECT, WRONG),
                          data["tokens"])


def test_rank_helpers() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x * 10) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert top_k_overlap(torch.tensor([5.0, -4.0, 0.1, 0.2]), torch.tensor([1.0, 0.0, 0.0, 9.0]), 2) == 0.5
