"""Every tiny family (Llama, GPT-2, Gemma 3, Qwen2) on both backends, each against a computation
written here by hand on the plain HF model: forward passes with eager attention, its
``output_attentions``, forward hooks placed by hand and naive loops.

Gemma 3 is the family that differs most: sliding-window layers next to global ones, QK-norm,
one kv head, embeddings scaled by sqrt(d_model), RMSNorm as x * (1 + w) and norms on each
sublayer's output; Qwen2 adds q/k/v biases under grouped-query attention.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import BertConfig, BertModel, MambaConfig, MambaForCausalLM

from circuits.methods.direct_path import head_effects
from interp.errors import UserError
from interp.model.interventions import Knockout, UniformAttention
from interp.patching.execution import run_sweep
from interp.patching.metrics import LogitDiff
from interp.patching.sweeps import Sweep
from interp.runs.registry import get_detector
from tests.conftest import TINY_FAMILIES
from tests.tiny import VOCAB, loaded

BACKENDS = ("bridge", "nnsight")
SEQ = 9  # longer than Gemma's window of 4, so its sliding layers mask keys a causal mask keeps


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hf(request: pytest.FixtureRequest, family: str) -> Any:
    """A private copy of the session's tiny model of ``family``."""
    return copy.deepcopy(request.getfixturevalue(f"tiny_{family}_hf"))


# ------------------------------------------------------------------ the model, read by hand


class Hand:
    """The parts of one plain HF model, named by hand per family (not via interp.model.layout)."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        cfg = hf.config
        self.gpt2 = hasattr(hf, "transformer")
        self.gemma = cfg.model_type == "gemma3_text"
        self.blocks = hf.transformer.h if self.gpt2 else hf.model.layers
        self.n_heads = cfg.n_head if self.gpt2 else cfg.num_attention_heads
        self.n_kv = self.n_heads if self.gpt2 else cfg.num_key_value_heads
        d = cfg.n_embd if self.gpt2 else cfg.hidden_size
        self.d, self.dh = d, getattr(cfg, "head_dim", None) or d // self.n_heads

    def attn(self, layer: int) -> Any:
        b = self.blocks[layer]
        return b.attn if self.gpt2 else b.self_attn

    def out_proj(self, layer: int) -> Any:
        a = self.attn(layer)
        return a.c_proj if self.gpt2 else a.o_proj

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, None for a global (causal only) layer."""
        types = getattr(self.hf.config, "layer_types", None)
        return self.hf.config.sliding_window if types and types[layer] == "sliding_attention" else None

    def visible(self, layer: int, n: int) -> torch.Tensor:
        """[n, n] bool: which keys each query sees at ``layer`` (causal, within the window)."""
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        w = self.window(layer)
        return (j <= i) & (i - j < w) if w is not None else j <= i

    def sites(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every site of every layer, from hooks placed by hand, and the logits."""
        store: dict[str, torch.Tensor] = {}
        handles: list[Any] = []

        def out(name: str, mod: Any, fn: Any = lambda o: o) -> None:
            handles.append(mod.register_forward_hook(lambda _m, _a, o: store.__setitem__(name, fn(o).detach().clone())))

        def inp(name: str, mod: Any, fn: Any = lambda x: x) -> None:
            def hook(_m: Any, args: tuple, kwargs: dict) -> None:
                x = args[0] if args else kwargs["hidden_states"]
                store[name] = fn(x).detach().clone()

            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))

        def heads(n: int) -> Any:
            return lambda x: x.reshape(*x.shape[:-1], n, self.dh)

        first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
        out("embed", self.hf.get_input_embeddings())
        for li, b in enumerate(self.blocks):
            a = self.attn(li)
            inp(f"resid_pre.{li}", b)
            out(f"resid_post.{li}", b, first)
            inp(f"z.{li}", self.out_proj(li), heads(self.n_heads))
            if self.gpt2:
                d = self.d
                for i, kind in enumerate("qkv"):
                    out(f"{kind}.{li}", a.c_attn, lambda o, i=i, d=d: heads(self.n_heads)(o[..., i * d : (i + 1) * d]))
                inp(f"resid_mid.{li}", b.ln_2)
            else:
                out(f"q.{li}", a.q_proj, heads(self.n_heads))
                out(f"k.{li}", a.k_proj, heads(self.n_kv))
                out(f"v.{li}", a.v_proj, heads(self.n_kv))
                # Llama's post_attention_layernorm is the MLP's input norm; Gemma's normalises the
                # attention output, and pre_feedforward_layernorm is the MLP's input norm.
                inp(f"resid_mid.{li}", b.pre_feedforward_layernorm if self.gemma else b.post_attention_layernorm)
            # What each sublayer adds to the residual: after Gemma's post-norms.
            out(f"attn_out.{li}", b.post_attention_layernorm if self.gemma else a, first)
            out(f"mlp_out.{li}", b.post_feedforward_layernorm if self.gemma else b.mlp)
        try:
            with torch.no_grad():
                res = self.hf(ids, output_attentions=True)
        finally:
            for h in handles:
                h.remove()
        for li, pat in enumerate(res.attentions):
            store[f"pattern.{li}"] = pat
        store["logits"] = res.logits
        return store

    def logits_with_z(self, ids: torch.Tensor, layer: int, z: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Logits of a plain pass whose z at ``layer`` [b, p, h, e] is replaced where ``where``
        [p, h] is true (a pre-hook on the output projection)."""

        def hook(_m: Any, args: tuple) -> tuple:
            x = args[0].reshape(*args[0].shape[:-1], self.n_heads, self.dh).clone()
            x[:, where] = z[:, where]
            return (x.reshape(args[0].shape),)

        h = self.out_proj(layer).register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                return self.hf(ids).logits
        finally:
            h.remove()


# ------------------------------------------------------------------ clean runs and sites


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_logits_and_every_site_equal_hand_written_hooks(request: pytest.FixtureRequest, family: str, backend: str) -> None:
    hf = _hf(request, family)
    hand = Hand(hf).sites(_ids())  # before loading: the bridge rewires the module tree it gets
    model = loaded(hf, backend)
    names = [n for n in hand if n != "logits"]
    out = model.run(_ids(), cache=names)
    torch.testing.assert_close(out.logits, hand["logits"], atol=1e-4, rtol=0)
    assert set(out.cache) == set(names)
    for name in names:
        torch.testing.assert_close(out.cache[name], hand[name], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_gemma_embed_site_is_scaled(request: pytest.FixtureRequest) -> None:
    """Causal tracing draws its noise at the std of the ``embed`` site: on Gemma that must be the
    embedding the layers see, the weight row times sqrt(d_model)."""
    hf = _hf(request, "gemma3")
    ids = _ids()
    by_hand = hf.model.embed_tokens.weight.detach()[ids] * hf.config.hidden_size**0.5
    for backend in BACKENDS:
        got = loaded(copy.deepcopy(hf), backend).run(ids, cache=["embed"]).cache["embed"]
        torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)


def test_gemma_sliding_layers_mask_outside_the_window(request: pytest.FixtureRequest) -> None:
    """The tiny Gemma has both kinds of layer, and its sliding ones really drop old keys."""
    hand = Hand(_hf(request, "gemma3"))
    pats = hand.sites(_ids())
    kinds = {hand.window(li) is None for li in range(len(hand.blocks))}
    assert kinds == {True, False}
    for li in range(len(hand.blocks)):
        seen = pats[f"pattern.{li}"] > 0
        assert torch.equal(seen, hand.visible(li, SEQ).expand_as(seen)), li


# ------------------------------------------------------------------ attention interventions


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_uniform_attention_equals_hand_built_masked_mean(request: pytest.FixtureRequest, family: str, backend: str) -> None:
    """Every layer (Gemma's sliding ones included): the head outputs the mean value over the keys
    its mask shows (causal, within the window), and the logits are those of a plain pass given
    that z."""
    hf = _hf(request, family)
    hand = Hand(copy.deepcopy(hf))
    ids = _ids()
    clean = hand.sites(ids)
    model = loaded(hf, backend)
    head = 1
    kv = head // (hand.n_heads // hand.n_kv)
    for layer in range(len(hand.blocks)):
        vis = hand.visible(layer, SEQ).double()
        mean_v = (vis / vis.sum(-1, keepdim=True)) @ clean[f"v.{layer}"][:, :, kv].double()  # [b, p, e]
        out = model.run(ids, interventions=[UniformAttention(layer=layer, heads=(head,))], cache=[f"z.{layer}"])
        torch.testing.assert_close(out.cache[f"z.{layer}"][:, :, head].double(), mean_v, atol=1e-5, rtol=1e-5)
        z = clean[f"z.{layer}"].clone()
        z[:, :, head] = mean_v.float()
        where = torch.zeros(SEQ, hand.n_heads, dtype=torch.bool)
        where[:, head] = True
        torch.testing.assert_close(out.logits, hand.logits_with_z(ids, layer, z, where), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_knockout_equals_hand_built_masked_attention(request: pytest.FixtureRequest, family: str) -> None:
    """Knocking out keys renormalises the rest of the (window-masked) pattern: z at the query is
    that row times V, and the logits are those of a plain pass given that z. Key 1 lies outside
    Gemma's window for the last query, so on its sliding layers only key 6 changes anything."""
    hf = _hf(request, family)
    hand = Hand(copy.deepcopy(hf))
    ids = _ids()
    clean = hand.sites(ids)
    model = loaded(hf, "bridge")  # knockout edits scores: a bridge capability
    query, keys = SEQ - 1, (1, 6)
    group = hand.n_heads // hand.n_kv
    for layer in range(len(hand.blocks)):
        row = clean[f"pattern.{layer}"][:, :, query].double().clone()  # [b, h, k]
        row[..., list(keys)] = 0
        row = row / row.sum(-1, keepdim=True)
        v = clean[f"v.{layer}"].double().repeat_interleave(group, dim=2)  # [b, k, h, e]
        z = clean[f"z.{layer}"].clone()
        z[:, query] = torch.einsum("bhk,bkhe->bhe", row, v).float()
        out = model.run(ids, interventions=[Knockout(layer, query_positions=(query,), key_positions=keys)],
                        cache=[f"z.{layer}"])
        torch.testing.assert_close(out.cache[f"z.{layer}"][:, query], z[:, query], atol=1e-5, rtol=1e-5)
        where = torch.zeros(SEQ, hand.n_heads, dtype=torch.bool)
        where[query] = True
        torch.testing.assert_close(out.logits, hand.logits_with_z(ids, layer, z, where), atol=1e-4, rtol=0)


def test_knockout_of_the_whole_window_is_refused_on_sliding_layers_only(request: pytest.FixtureRequest) -> None:
    """The last 4 keys are all a sliding layer shows the last query: knocking them out leaves
    nothing (a UserError); a global layer still sees the earlier keys."""
    hand = Hand(_hf(request, "gemma3"))
    model = loaded(_hf(request, "gemma3"), "bridge")
    window = tuple(range(SEQ - 4, SEQ))
    for layer in range(len(hand.blocks)):
        knock = Knockout(layer, query_positions=(SEQ - 1,), key_positions=window)
        if hand.window(layer) is not None:
            with pytest.raises(UserError, match="every key"):
                model.run(_ids(), interventions=[knock])
        else:
            model.run(_ids(), interventions=[knock])


# ------------------------------------------------------------------ prefix reuse with biases


def test_prefix_reuse_equals_full_passes_on_qwen2(request: pytest.FixtureRequest) -> None:
    """The engine enters later layers with a stored residual (run_from_layer); with Qwen2's
    q/k/v biases its numbers equal plain HF passes with one head's z patched by hand."""
    hf = _hf(request, "qwen2")
    hand = Hand(copy.deepcopy(hf))
    tokens, source = _ids(3, 7, seed=1), _ids(3, 7, seed=2)
    correct, wrong = (5, 6, 7), (8, 9, 10)
    model = loaded(hf, "bridge")
    fast = run_sweep(model, Sweep("heads", "patch"), LogitDiff(correct, wrong), tokens, source, max_cases=4)
    slow = run_sweep(model, Sweep("heads", "patch"), LogitDiff(correct, wrong), tokens, source, max_cases=4,
                     prefix_reuse=False, sequence_reuse=False)
    assert fast.stats["token_layers"] < slow.stats["token_layers"]
    src = hand.sites(source)
    rows = torch.arange(3)
    expected = []
    for layer in range(len(hand.blocks)):
        for head in range(hand.n_heads):
            where = torch.zeros(7, hand.n_heads, dtype=torch.bool)
            where[:, head] = True
            last = hand.logits_with_z(tokens, layer, src[f"z.{layer}"], where)[:, -1]
            expected.append(last[rows, list(correct)] - last[rows, list(wrong)])
    torch.testing.assert_close(fast.values.float(), torch.stack(expected), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(slow.values.float(), torch.stack(expected), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ what a family cannot do


def test_direct_attribution_through_a_post_attention_norm(request: pytest.FixtureRequest) -> None:
    """Gemma's post-attention norm makes a head's output no additive share of the residual. The
    DLA freezes that norm's scale at the conflict run, so a layer's heads must sum to what the
    layer adds to the residual, P(S), read here by hooks on plain HF: each layer's
    post_attention_layernorm output at the final position, through the final norm frozen at
    the final residual, onto W_U."""
    from circuits.data.conflicts import make_item
    from circuits.data.facts import Fact

    hf = _hf(request, "gemma3")
    model = loaded(copy.deepcopy(hf))
    item = make_item(model, Fact("w5", "w5 w6 w7", "w10", "r", "t"), "w11")
    got = head_effects(model, [item], "restated")
    ids = torch.tensor([[0, *model.tokenizer(item.conflict_prompt("restated"), add_special_tokens=False)["input_ids"]]])
    added: dict[int, torch.Tensor] = {}
    captured: dict[str, torch.Tensor] = {}
    handles = [block.post_attention_layernorm.register_forward_hook(
        lambda m, a, out, i=i: added.__setitem__(i, out[0, -1].detach().clone()))
        for i, block in enumerate(hf.model.layers)]
    handles.append(hf.model.norm.register_forward_pre_hook(lambda m, a: captured.__setitem__("r", a[0][0, -1].clone())))
    with torch.no_grad():
        hf(ids)
    for h in handles:
        h.remove()
    r, norm = captured["r"], hf.model.norm
    w_u = hf.lm_head.weight.detach()
    for layer, out in added.items():
        normed = out / torch.sqrt(r.pow(2).mean() + norm.eps) * (1 + norm.weight.detach())
        rows = got[got["layer"] == layer]
        assert float(rows["dla_memory"].sum()) == pytest.approx(float(w_u[item.memory_token] @ normed), abs=1e-4)
        assert float(rows["dla_context"].sum()) == pytest.approx(float(w_u[item.context_token] @ normed), abs=1e-4)
    # The detectors built on it list their units on this family (they refused before).
    for name in ("conflict-heads", "ph3"):
        detector = get_detector(name)
        assert detector.units(model, detector.parse_params({}))


@pytest.mark.parametrize(
    ("build", "missing"),
    [
        (lambda: MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2)),
         r"unsupported architecture MambaForCausalLM \(model_type 'mamba'\).*no model \(decoder\)"),
        (lambda: BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32)),
         r"unsupported architecture BertModel \(model_type 'bert'\).*no model \(decoder\)"),
    ],
    ids=["mamba", "bert"],
)
def test_unsupported_architecture_is_refused_at_load(build: Any, missing: str) -> None:
    """A model the workbench cannot hook is a UserError naming what it lacks when it is
    loaded, before any backend is built or any run starts."""
    with pytest.raises(UserError, match=missing):
        loaded(build())

