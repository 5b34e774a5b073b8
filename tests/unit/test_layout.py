"""One architecture layout (interp.model.layout) and the backend contract (interp.model.backends)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from interp.errors import UserError
from interp.model.backends import Backend, BridgeBackend, Capabilities, NNsightBackend
from interp.model.layout import (
    GEMMA_LIKE,
    GPT2_LIKE,
    LLAMA_LIKE,
    MODEL_TYPES,
    layout_of,
    resolve,
    unembedding,
    unwrap,
)
from tests.tiny import loaded, no_hooks_left


def _hand(hf: Any) -> dict[str, Any]:
    """Layer 1's modules, found by hand on the plain HF model."""
    if hasattr(hf, "transformer"):
        t = hf.transformer
        return {"o": t.h[1].attn.c_proj, "qkv": t.h[1].attn.c_attn, "attn_norm": t.h[1].ln_1,
                "final_norm": t.ln_f, "embed": t.wte, "mlp": t.h[1].mlp}
    m = hf.model
    hand = {"o": m.layers[1].self_attn.o_proj, "v": m.layers[1].self_attn.v_proj, "attn_norm": m.layers[1].input_layernorm,
            "final_norm": m.norm, "embed": m.embed_tokens, "mlp": m.layers[1].mlp}
    if hf.config.model_type == "gemma3_text":  # norms on the sublayer outputs
        hand |= {"attn_post_norm": m.layers[1].post_attention_layernorm,
                 "mlp_post_norm": m.layers[1].post_feedforward_layernorm}
    return hand


def _family(hf: Any) -> Any:
    """The layout each tiny family must get, by hand."""
    if hasattr(hf, "transformer"):
        return GPT2_LIKE
    return GEMMA_LIKE if hf.config.model_type == "gemma3_text" else LLAMA_LIKE


def test_layout_finds_the_same_modules_plain_and_bridged(tiny_hf: torch.nn.Module) -> None:
    hf = copy.deepcopy(tiny_hf)
    hand = _hand(hf)
    layout = layout_of(hf)
    assert layout is _family(hf)
    model = loaded(hf, "bridge")
    _ = model.backend  # the bridge rewires hf's module tree in place
    assert model.layout is layout
    for role, mod in hand.items():
        layer = None if role in ("final_norm", "embed") else 1
        assert layout.module(hf, role, layer) is mod, role
    assert layout.module(hf, "unembed") is unembedding(hf) is model.backend.bridge.unembed.original_component  # type: ignore[attr-defined]
    # live: the module the forward pass calls (the bridge wraps Llama's o_proj, not GPT-2's
    # c_proj), whose HF module is the plain one.
    live = layout.module(hf, "o", 1, live=True)
    assert (live is hand["o"]) == (layout is GPT2_LIKE)
    assert unwrap(live) is hand["o"]


def test_weights_are_out_by_in(tiny_hf: torch.nn.Module) -> None:
    hf = copy.deepcopy(tiny_hf)
    model = loaded(hf)
    info, layout = model.info, model.layout
    w_o = layout.weight(hf, "o", 0)
    assert w_o.shape == (info.d_model, info.n_heads * info.d_head)
    w_v = layout.value_weight(hf, 0, info)
    assert w_v.shape == (info.n_kv_heads * info.d_head, info.d_model)
    x = torch.randn(2, info.d_model)
    # v = W_V x: the projection's output minus its bias (its output at 0).
    if layout.fused_qkv:
        fused = layout.module(hf, "qkv", 0)
        q, k, _ = layout.qkv_sizes(info)
        want = (fused(x) - fused(torch.zeros_like(x)))[:, q + k :]
    else:
        v = layout.module(hf, "v", 0)
        want = v(x) - v(torch.zeros_like(x))
    torch.testing.assert_close(x @ w_v.T, want, atol=1e-5, rtol=1e-5)
    o = layout.module(hf, "o", 0)
    z = torch.randn(2, info.n_heads * info.d_head)
    torch.testing.assert_close(z @ w_o.T, o(z) - o(torch.zeros_like(z)), atol=1e-5, rtol=1e-5)


def test_unknown_architecture_names_what_is_missing() -> None:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8,
                                      num_attention_heads=2, vocab_size=16)
            setattr(self.config, "model_type", "oddball")  # noqa: B010 (a ClassVar on the class)
            self.decoder = torch.nn.Linear(2, 2)

    with pytest.raises(UserError, match=r"unsupported architecture .*'oddball'.*llama-like: no model \(decoder\)"):
        layout_of(Odd())
    # A listed model type without its family's modules.
    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                      vocab_size=16)
    broken: Any = LlamaForCausalLM(cfg)
    del broken.model.norm
    with pytest.raises(UserError, match=r"llama-like layout but has no module at model\.norm \(final_norm\)"):
        layout_of(broken)
    # An unlisted model type whose modules carry the Llama names gets that layout.
    ok = LlamaForCausalLM(cfg)
    setattr(ok.config, "model_type", "llama-port")  # noqa: B010 (a ClassVar on the class)
    assert "llama-port" not in MODEL_TYPES
    assert layout_of(ok) is LLAMA_LIKE


def test_resolve_follows_indices() -> None:
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                      vocab_size=16)
    hf: Any = LlamaForCausalLM(cfg)
    assert resolve(hf, "model.layers.1.self_attn.o_proj") is hf.model.layers[1].self_attn.o_proj
    with pytest.raises(UserError, match="no separate q projection"):
        GPT2_LIKE.path("q", 0)


def test_backend_contract(tiny_hf: torch.nn.Module) -> None:
    for cls in (BridgeBackend, NNsightBackend):
        assert issubclass(cls, Backend)
    bridge = loaded(copy.deepcopy(tiny_hf), "bridge")
    nn = loaded(copy.deepcopy(tiny_hf), "nnsight")
    caps = bridge.backend.capabilities
    assert caps == Capabilities(kv_cache=True, attention_scores=True, attention_patterns=True, knockout=True,
                                run_from_layer=True, forward_kwargs=True)
    assert not nn.backend.capabilities.run_from_layer
    assert not nn.backend.capabilities.kv_cache
    ids = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="cannot start a pass at a layer"):
        nn.backend.run_from_layer(torch.zeros(2, 6, nn.info.d_model), 1)
    with pytest.raises(UserError, match="no forward_kwargs"):
        nn.backend.run(ids, forward_kwargs={"logits_to_keep": 1})
    # run_from_layer: resuming the base run at layer 2 from its residual gives its logits back,
    # and leaves no hook or pass-through behind.
    with torch.no_grad():
        full = bridge.run(ids, cache=["resid_pre.2"])
        with no_hooks_left(bridge):
            again = bridge.backend.run_from_layer(full.cache["resid_pre.2"], 2)
        torch.testing.assert_close(again.logits, full.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bridge.run(ids).logits, full.logits)


def test_run_from_layer_before_any_run(tiny_hf: torch.nn.Module) -> None:
    """The bridge learns how a block returns on its own when run_from_layer comes first."""
    model = loaded(copy.deepcopy(tiny_hf), "bridge")
    ids = torch.randint(4, 100, (1, 5), generator=torch.Generator().manual_seed(1))
    plain: Any = copy.deepcopy(tiny_hf)
    with torch.no_grad():
        if hasattr(plain, "model"):
            resid = plain.model.embed_tokens(ids)
        else:
            resid = plain.transformer.wte(ids) + plain.transformer.wpe(torch.arange(5))[None]
        out = model.backend.run_from_layer(resid, 0)
        torch.testing.assert_close(out.logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
