"""Every intervention against a hand-written reference on tiny random models (both backends)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from interp.errors import UserError
from interp.model.interventions import (
    AblateHeads,
    AddNoise,
    Knockout,
    Patch,
    ScaleValue,
    UniformAttention,
    ablate_heads,
    from_dict,
)
from interp.model.loaded import LoadedModel
from tests.tiny import VOCAB, loaded

BACKENDS = ["bridge", "nnsight"]
D_HEAD = 16


def _ids(batch: int = 2, seq: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, seq), generator=g)


def _o_proj(hf: torch.nn.Module, layer: int) -> torch.nn.Module:
    if hasattr(hf, "transformer"):
        return hf.transformer.h[layer].attn.c_proj  # type: ignore[union-attr,index]
    return hf.model.layers[layer].self_attn.o_proj  # type: ignore[union-attr,index]


def _with_z_edit(hf: torch.nn.Module, layer: int, edit: Callable[[torch.Tensor], torch.Tensor]) -> torch.nn.Module:
    """A copy of the HF model whose output projection at `layer` sees an edited input
    (z reshaped to [b, p, heads, d_head]), via a plain PyTorch forward pre-hook."""
    ref = copy.deepcopy(hf)

    def pre(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        z = x.reshape(*x.shape[:-1], -1, D_HEAD).clone()
        return (edit(z).reshape(x.shape),)

    _o_proj(ref, layer).register_forward_pre_hook(pre)
    return ref


def _logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits  # type: ignore[operator]


@pytest.fixture(params=BACKENDS)
def model(request: pytest.FixtureRequest, tiny_hf: torch.nn.Module) -> LoadedModel:
    return loaded(copy.deepcopy(tiny_hf), request.param)


def test_clean_run_equals_hf(model: LoadedModel, tiny_hf: torch.nn.Module) -> None:
    ids = _ids()
    out = model.run(ids)
    assert torch.allclose(out.logits, _logits(tiny_hf, ids), atol=1e-5)


def test_zero_ablation_equals_removing_output_projection_slice(model: LoadedModel, tiny_hf: torch.nn.Module) -> None:
    ids = _ids()
    ref = copy.deepcopy(tiny_hf)
    with torch.no_grad():
        o = _o_proj(ref, 1)
        w = o.weight  # type: ignore[union-attr]
        if hasattr(ref, "transformer"):  # GPT-2 Conv1D: weight is [in, out]
            w[1 * D_HEAD : 2 * D_HEAD, :] = 0
        else:  # nn.Linear: weight is [out, in]
            w[:, 1 * D_HEAD : 2 * D_HEAD] = 0
    out = model.run(ids, interventions=[AblateHeads(layer=1, heads=(1,))])
    assert torch.allclose(out.logits, _logits(ref, ids), atol=1e-5)
    assert not torch.allclose(out.logits, _logits(tiny_hf, ids), atol=1e-3)


def test_patching_with_own_cache_changes_nothing(model: LoadedModel) -> None:
    ids = _ids()
    sites = ["embed", "resid_pre.1", "resid_post.0", "attn_out.2", "mlp_out.1", "z.1", "q.2", "v.0", "k.1"]
    clean = model.run(ids, cache=sites)
    patched = model.run(ids, interventions=[Patch(site_name=s) for s in sites], sources={"clean": clean.cache})
    assert torch.allclose(patched.logits, clean.logits, atol=1e-6)


def test_patch_from_other_run_equals_reference(model: LoadedModel, tiny_hf: torch.nn.Module) -> None:
    clean_ids, corrupt_ids = _ids(seed=1), _ids(seed=2)
    clean = model.run(clean_ids, cache=["z.1"])
    src = clean.cache["z.1"]
    out = model.run(
        corrupt_ids,
        interventions=[Patch(site_name="z.1", heads=(2,), positions=(3, 5))],
        sources={"clean": clean.cache},
    )

    def edit(z: torch.Tensor) -> torch.Tensor:
        z[:, [3, 5], 2] = src[:, [3, 5], 2]
        return z

    assert torch.allclose(out.logits, _logits(_with_z_edit(tiny_hf, 1, edit), corrupt_ids), atol=1e-5)


def test_mean_and_resample_ablation(model: LoadedModel, tiny_hf: torch.nn.Module) -> None:
    ids, ref_ids = _ids(seed=3), _ids(seed=4)
    ref_cache = model.run(ref_ids, cache=["z.0"]).cache
    mean = ref_cache["z.0"][:, :, 3].mean(dim=(0, 1))
    out = model.run(ids, interventions=[AblateHeads(layer=0, heads=(3,), method="mean", source="ref")],
                    sources={"ref": ref_cache})

    def edit_mean(z: torch.Tensor) -> torch.Tensor:
        z[:, :, 3] = mean
        return z

    assert torch.allclose(out.logits, _logits(_with_z_edit(tiny_hf, 0, edit_mean), ids), atol=1e-5)

    out = model.run(ids, interventions=[AblateHeads(layer=0, heads=(3,), method="resample", source="ref")],
                    sources={"ref": ref_cache})

    def edit_resample(z: torch.Tensor) -> torch.Tensor:
        z[:, :, 3] = ref_cache["z.0"][:, :, 3]
        return z

    assert torch.allclose(out.logits, _logits(_with_z_edit(tiny_hf, 0, edit_resample), ids), atol=1e-5)


def test_scale_value_equals_scaling_the_head_output(model: LoadedModel, tiny_hf: torch.nn.Module) -> None:
    ids = _ids()
    out = model.run(ids, interventions=[ScaleValue(layer=2, heads=(0,), factor=2.5)])

    def edit(z: torch.Tensor) -> torch.Tensor:
        z[:, :, 0] *= 2.5
        return z

    assert torch.allclose(out.logits, _logits(_with_z_edit(tiny_hf, 2, edit), ids), atol=1e-5)
    zeroed = model.run(ids, interventions=[ScaleValue(layer=2, heads=(0,), factor=0.0)])
    ablated = model.run(ids, interventions=[AblateHeads(layer=2, heads=(0,))])
    assert torch.allclose(zeroed.logits, ablated.logits, atol=1e-6)


def test_uniform_attention_gives_uniform_pattern_per_query_head(model: LoadedModel) -> None:
    ids = _ids(seq=7)
    out = model.run(ids, interventions=[UniformAttention(layer=1, heads=(0,))], cache=["pattern.1", "v.1", "z.1"])
    pat = out.cache["pattern.1"]
    n = ids.shape[1]
    expected = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    assert torch.allclose(pat[:, 0], expected.expand_as(pat[:, 0]), atol=1e-6)
    # Head 1 shares head 0's kv group under GQA and must keep its own, non-uniform pattern.
    assert not torch.allclose(pat[:, 1], expected.expand_as(pat[:, 1]), atol=1e-3)
    # The head outputs the running mean of its kv group's values.
    v = out.cache["v.1"][:, :, 0]  # head 0 uses kv head 0 in both layouts
    running_mean = torch.cumsum(v, dim=1) / torch.arange(1, n + 1)[None, :, None]
    assert torch.allclose(out.cache["z.1"][:, :, 0], running_mean, atol=1e-5)


def test_knockout_renormalises_remaining_attention(tiny_hf: torch.nn.Module) -> None:
    model = loaded(copy.deepcopy(tiny_hf), "bridge")
    ids = _ids(seq=8)
    clean = model.run(ids, cache=["pattern.2"]).cache["pattern.2"]
    blocked = (1, 2, 3)
    out = model.run(ids, interventions=[Knockout(layer=2, query_positions=(7,), key_positions=blocked)],
                    cache=["pattern.2"])
    pat = out.cache["pattern.2"]
    row = clean[:, :, 7].clone()
    row[..., list(blocked)] = 0
    row = row / row.sum(-1, keepdim=True)
    assert torch.allclose(pat[:, :, 7], row, atol=1e-6)
    assert torch.allclose(pat[:, :, :7], clean[:, :, :7], atol=1e-6)


def test_knockout_of_every_key_is_refused(tiny_hf: torch.nn.Module) -> None:
    model = loaded(copy.deepcopy(tiny_hf), "bridge")
    with pytest.raises(UserError, match="every key"):
        model.run(_ids(seq=5), interventions=[Knockout(layer=0, query_positions=(2,), key_positions=(0, 1, 2))])


def test_knockout_needs_bridge(tiny_hf: torch.nn.Module) -> None:
    model = loaded(copy.deepcopy(tiny_hf), "nnsight")
    with pytest.raises(UserError, match="bridge"):
        model.run(_ids(), interventions=[Knockout(layer=0, query_positions=(2,), key_positions=(0,))])


def test_batch_restricted_interventions_equal_separate_runs(model: LoadedModel) -> None:
    ids = _ids(batch=1).repeat(3, 1)
    ivs = [AblateHeads(layer=1, heads=(2,), batch=(1,)), ScaleValue(layer=0, heads=(1,), factor=3.0, batch=(2,))]
    out = model.run(ids, interventions=ivs).logits
    base = model.run(ids[:1]).logits
    one = model.run(ids[:1], interventions=[AblateHeads(layer=1, heads=(2,))]).logits
    two = model.run(ids[:1], interventions=[ScaleValue(layer=0, heads=(1,), factor=3.0)]).logits
    assert torch.allclose(out[0:1], base, atol=1e-5)
    assert torch.allclose(out[1:2], one, atol=1e-5)
    assert torch.allclose(out[2:3], two, atol=1e-5)


def test_add_noise_is_reproducible_by_hand(model: LoadedModel, tiny_hf: torch.nn.Module) -> None:
    ids = _ids(batch=2, seq=6)
    out = model.run(ids, interventions=[AddNoise(site_name="embed", positions=(1, 2), std=0.5, seed=7)])
    ref = copy.deepcopy(tiny_hf)
    emb = ref.get_input_embeddings()  # type: ignore[operator]
    noise = torch.randn((2, 2, 64), generator=torch.Generator().manual_seed(7)) * 0.5

    def hook(_m: torch.nn.Module, _i: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, 1:3] += noise
        return x

    emb.register_forward_hook(hook)
    assert torch.allclose(out.logits, _logits(ref, ids), atol=1e-5)


def _hook_count(model: LoadedModel) -> int:
    mods = list(model.hf.modules())
    if model.backend_name == "bridge":
        mods += list(model.backend.bridge.modules())  # type: ignore[attr-defined]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


def test_hooks_are_removed_after_an_exception(model: LoadedModel, tiny_hf: torch.nn.Module) -> None:
    ids = _ids()
    model.run(ids)
    before = _hook_count(model)
    with pytest.raises(UserError):
        # The second intervention fails mid-forward (its source run is missing).
        model.run(ids, interventions=[AblateHeads(layer=0, heads=(0,)), Patch(site_name="z.2", source="nope")])
    assert _hook_count(model) == before
    assert torch.allclose(model.run(ids).logits, _logits(tiny_hf, ids), atol=1e-5)


def test_out_of_range_indices_are_user_errors(model: LoadedModel) -> None:
    ids = _ids()
    with pytest.raises(UserError, match="layer"):
        model.run(ids, interventions=[AblateHeads(layer=9, heads=(0,))])
    with pytest.raises(UserError, match="head"):
        model.run(ids, interventions=[AblateHeads(layer=0, heads=(4,))])
    with pytest.raises(UserError, match=r"kv|head"):
        model.run(ids, interventions=[Patch(site_name="v.0", heads=(5,))], sources={"clean": {}})


def test_interventions_round_trip_as_data() -> None:
    ivs = [
        Patch(site_name="z.3", heads=(1, 2), positions=(4,), batch=(0,)),
        AblateHeads(layer=2, heads=(0,), method="mean", source="ref"),
        UniformAttention(layer=1, heads=(3,)),
        ScaleValue(layer=0, heads=(1,), factor=0.5),
        Knockout(layer=4, query_positions=(9,), key_positions=(1, 2)),
        AddNoise(site_name="embed", positions=(1, 2), std=0.1, seed=3),
    ]
    for iv in ivs:
        assert from_dict(iv.to_dict()) == iv
    with pytest.raises(UserError):
        from_dict({"op": "explode"})


def test_kv_cache_decoding_equals_full_forward(tiny_hf: torch.nn.Module) -> None:
    """Step-by-step decoding through the bridge's KV cache gives the full pass's logits."""
    model = loaded(copy.deepcopy(tiny_hf), "bridge")
    ids = _ids(batch=2, seq=8)
    full = model.run(ids).logits
    out = model.run(ids[:, :5], use_cache=True)
    assert torch.allclose(out.logits, full[:, :5], atol=1e-5)
    pkv = out.past_key_values
    for t in range(5, 8):
        step = model.run(ids[:, t : t + 1], past_key_values=pkv)
        assert torch.allclose(step.logits[:, -1], full[:, t], atol=1e-4), f"step {t}"
        pkv = step.past_key_values


@pytest.mark.parametrize("backend", ["bridge", "nnsight"])
def test_last_logits_only_equals_the_last_row_of_full_logits(tiny_hf: torch.nn.Module, backend: str) -> None:
    model = loaded(copy.deepcopy(tiny_hf), backend)
    ids = torch.tensor([[0, 5, 6, 7, 8], [0, 9, 10, 11, 12]])
    ivs = ablate_heads([(1, 0)], "zero")
    with torch.no_grad():
        full = model.run(ids, interventions=ivs).logits
        last = model.run(ids, interventions=ivs, last_logits_only=True).logits
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
