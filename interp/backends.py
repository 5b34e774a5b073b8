"""Hook backends: run a model with interventions applied and activations cached.

Two backends implement the same contract over the same named sites:

- ``bridge`` (default): TransformerLens 4's ``TransformerBridge`` over the HF model; its
  hook points give every site, attention scores included.
- ``nnsight``: nnsight's ``LanguageModel`` over the HF modules (the route to remote
  execution). Attention scores live inside HF's attention function, so knockout and
  ``scores`` need the bridge; ``pattern`` needs eager attention.

Hooks are always removed when a run ends, also when the forward pass raises.
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from interp.errors import UserError
from interp.interventions import Intervention, Sources
from interp.sites import LAYER_KINDS, Site, expand_sites, parse_site

if TYPE_CHECKING:
    from interp.model import LoadedModel


@dataclass
class RunOutput:
    logits: torch.Tensor
    cache: dict[str, torch.Tensor] = field(default_factory=dict)
    past_key_values: Any = None


def _group(interventions: Sequence[Intervention], model: LoadedModel) -> dict[str, list[Intervention]]:
    info = model.info
    groups: dict[str, list[Intervention]] = defaultdict(list)
    for iv in interventions:
        iv.check(info.n_layers, info.n_heads, info.n_kv_heads)
        groups[str(iv.site)].append(iv)
    return groups


def _cache_sites(cache: Sequence[str | Site], model: LoadedModel) -> set[str]:
    patterns = [str(c) for c in cache]
    return {str(s) for s in expand_sites(patterns, model.info.n_layers)}


class Backend:
    name: str = "base"

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def run(
        self,
        input_ids: torch.Tensor,
        *,
        interventions: Sequence[Intervention] = (),
        cache: Sequence[str | Site] = (),
        sources: Sources | None = None,
        attention_mask: torch.Tensor | None = None,
        grad: bool = False,
        cache_to_cpu: bool = False,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> RunOutput:
        raise NotImplementedError


def _bridge_label(name: str) -> str:
    """The name handed to TransformerLens, which records it as the bridge's ``cfg.model_name``.

    It is only a label (the bridge gets our HF model and tokenizer), but TransformerLens first
    looks it up in its table of deprecated model aliases and, on a match, logs a deprecation
    notice and records the official name of *its* model instead, which need not be ours: the
    zoo's ``qwen2.5-0.5b`` is Qwen2.5-Coder-0.5B-Instruct, TransformerLens's alias means
    Qwen/Qwen2.5-0.5B (hub ids such as ``EleutherAI/pythia-1.3b`` are aliases too). Such a name
    gets a prefix that no alias has.
    """
    try:
        from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

        is_alias = resolve_model_alias(name) is not None
    except Exception:  # the table moved or is unreadable: do not risk the lookup
        is_alias = True
    return f"interp:{name}" if is_alias else name


class BridgeBackend(Backend):
    name = "bridge"

    def __init__(self, model: LoadedModel) -> None:
        super().__init__(model)
        from transformer_lens.model_bridge import TransformerBridge

        # The bridge re-loads a tokenizer from its name unless told BOS handling is settled;
        # that reload would reach for the hub. We always feed it token ids, so give it a copy
        # marked as settled.
        tok = copy.copy(model.tokenizer)
        tok.init_kwargs = {**tok.init_kwargs, "add_bos_token": True}
        tok.init_kwargs.setdefault("name_or_path", model.name)
        with contextlib.redirect_stdout(None):
            self.bridge = TransformerBridge.boot_transformers(
                _bridge_label(model.name), hf_model=model.hf, tokenizer=tok, device=str(model.device)
            )
        self.bridge.eval()

    @contextlib.contextmanager
    def _kv_cache_alias(self, active: bool) -> Iterator[None]:
        """Let the bridge's attention read and extend HF's KV cache.

        transformers 5 passes the cache to attention modules as ``cache=``, while the
        TransformerLens 4.3 attention bridge reads ``past_key_values=``: without this alias
        every decoding step attends to itself alone, silently. Hooks go when the run ends.
        """
        if not active:
            yield
            return
        from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

        def alias(_mod: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs["cache"]
            return args, kwargs

        handles = [
            m.register_forward_pre_hook(alias, with_kwargs=True)
            for m in self.bridge.modules()
            if isinstance(m, AttentionBridge)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def hook_name(site: Site) -> str:
        if site.kind == "embed":
            return "hook_embed"
        layer = site.layer
        block_hooks = {
            "resid_pre": "hook_resid_pre",
            "resid_mid": "hook_resid_mid",
            "resid_post": "hook_resid_post",
            "attn_out": "hook_attn_out",
            "mlp_out": "hook_mlp_out",
            "q": "attn.hook_q",
            "k": "attn.hook_k",
            "v": "attn.hook_v",
            "z": "attn.hook_z",
            "scores": "attn.hook_attn_scores",
            "pattern": "attn.hook_pattern",
        }
        return f"blocks.{layer}.{block_hooks[site.kind]}"

    def run(
        self,
        input_ids: torch.Tensor,
        *,
        interventions: Sequence[Intervention] = (),
        cache: Sequence[str | Site] = (),
        sources: Sources | None = None,
        attention_mask: torch.Tensor | None = None,
        grad: bool = False,
        cache_to_cpu: bool = False,
        past_key_values: Any = None,
        use_cache: bool = False,
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> RunOutput:
        # forward_kwargs go to the bridge's forward as they are (the patching engine passes
        # start_at_layer, logits_to_keep); with a float residual as input_ids under start_at_layer.
        groups = _group(interventions, self.model)
        to_cache = _cache_sites(cache, self.model)
        srcs: Sources = sources or {}
        store: dict[str, torch.Tensor] = {}

        def make_hook(site_name: str):
            ivs = groups.get(site_name, [])
            keep = site_name in to_cache

            def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
                if ivs:
                    x = x.clone()
                    for iv in ivs:
                        x = iv.apply(x, srcs)
                if keep:
                    if grad:
                        if x.requires_grad:
                            x.retain_grad()
                        store[site_name] = x
                    else:
                        store[site_name] = x.detach().cpu() if cache_to_cpu else x.detach()
                return x

            return hook

        fwd_hooks = [
            (self.hook_name(parse_site(name)), make_hook(name)) for name in sorted(set(groups) | to_cache)
        ]
        kwargs: dict[str, Any] = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return_type = "logits"
        if past_key_values is not None or use_cache:
            kwargs["past_key_values"] = past_key_values
            kwargs["use_cache"] = True
            return_type = "logits_and_cache"
        kwargs.update(forward_kwargs or {})
        with (
            torch.set_grad_enabled(grad),
            self.bridge.hooks(fwd_hooks=fwd_hooks),
            self._kv_cache_alias(return_type == "logits_and_cache"),
        ):
            out = self.bridge(input_ids, return_type=return_type, **kwargs)
        if return_type == "logits_and_cache":
            logits, pkv = out
            return RunOutput(logits=logits, cache=store, past_key_values=pkv)
        return RunOutput(logits=out, cache=store)


class _Modules:
    """Where each site lives in an HF decoder (Llama-like and GPT-2-like layouts)."""

    def __init__(self, hf: Any) -> None:
        base = getattr(hf, "model", None) or getattr(hf, "transformer", None)
        if base is None:
            raise UserError(f"nnsight backend: unsupported model layout {type(hf).__name__}")
        self.gpt2 = hasattr(base, "h")
        self.base_name = "model" if hasattr(hf, "model") else "transformer"


class NNsightBackend(Backend):
    name = "nnsight"

    def __init__(self, model: LoadedModel) -> None:
        super().__init__(model)
        from nnsight import LanguageModel

        self.lm = LanguageModel(model.hf, tokenizer=model.tokenizer)
        self.layout = _Modules(model.hf)

    def _base(self) -> Any:
        return getattr(self.lm, self.layout.base_name)

    def _layer(self, i: int) -> Any:
        base = self._base()
        return base.h[i] if self.layout.gpt2 else base.layers[i]

    def _attn(self, i: int) -> Any:
        layer = self._layer(i)
        return layer.attn if self.layout.gpt2 else layer.self_attn

    # Execution order of the sites inside one decoder layer.
    _ORDER = ("resid_pre", "q", "k", "v", "z", "attn_out", "pattern", "resid_mid", "mlp_out", "resid_post")

    def run(
        self,
        input_ids: torch.Tensor,
        *,
        interventions: Sequence[Intervention] = (),
        cache: Sequence[str | Site] = (),
        sources: Sources | None = None,
        attention_mask: torch.Tensor | None = None,
        grad: bool = False,
        cache_to_cpu: bool = False,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> RunOutput:
        import nnsight

        if past_key_values is not None or use_cache:
            raise UserError("the nnsight backend does not step a KV cache here; use backend='bridge'")
        groups = _group(interventions, self.model)
        to_cache = _cache_sites(cache, self.model)
        for name in set(groups) | to_cache:
            kind = parse_site(name).kind
            if kind == "scores":
                raise UserError("attention scores (and knockout) need the bridge backend")
            if kind in ("pattern", "resid_mid") and name in groups:
                raise UserError(f"site {kind!r} can be cached but not edited on the nnsight backend")
        srcs: Sources = sources or {}
        info = self.model.info
        store: dict[str, torch.Tensor] = {}

        def process(name: str, x: torch.Tensor) -> torch.Tensor | None:
            ivs = groups.get(name, [])
            if ivs:
                x = x.clone()
                for iv in ivs:
                    x = iv.apply(x, srcs)
            if name in to_cache:
                store[name] = x if grad else (x.detach().cpu() if cache_to_cpu else x.detach())
            return x if ivs else None

        wanted = set(groups) | to_cache
        by_layer: dict[int, list[str]] = defaultdict(list)
        for name in wanted:
            site = parse_site(name)
            if site.layer is not None:
                by_layer[site.layer].append(name)

        kwargs: dict[str, Any] = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        with torch.set_grad_enabled(grad), self.lm.trace(input_ids, **kwargs):
            if "embed" in wanted:
                emb = self._base().wte if self.layout.gpt2 else self._base().embed_tokens
                new = process("embed", emb.output)
                if new is not None:
                    emb.output = new
            for layer in sorted(by_layer):
                names = sorted(by_layer[layer], key=lambda n: self._ORDER.index(parse_site(n).kind))
                self._run_layer(layer, names, process, info)
            logits = nnsight.save(self.lm.output.logits)
        return RunOutput(logits=logits, cache=store)

    def _run_layer(self, layer: int, names: list[str], process: Any, info: Any) -> None:
        block = self._layer(layer)
        attn = self._attn(layer)
        b_h = info.n_heads
        kinds = {parse_site(n).kind: n for n in names}
        resid_pre = None
        if "resid_pre" in kinds or "resid_mid" in kinds:
            resid_pre = block.input
            new = process(kinds["resid_pre"], resid_pre) if "resid_pre" in kinds else None
            if new is not None:
                block.input = new
                resid_pre = new
        if self.layout.gpt2:
            if any(k in kinds for k in ("q", "k", "v")):
                qkv = attn.c_attn.output
                d = info.d_model
                parts = list(qkv.split(d, dim=-1))
                for i, kind in enumerate(("q", "k", "v")):
                    if kind in kinds:
                        x = parts[i].reshape(*parts[i].shape[:-1], b_h, info.d_head)
                        new = process(kinds[kind], x)
                        if new is not None:
                            parts[i] = new.reshape(parts[i].shape)
                attn.c_attn.output = torch.cat(parts, dim=-1)
            o_proj = attn.c_proj
        else:
            for kind, mod_name, n in (("q", "q_proj", b_h), ("k", "k_proj", info.n_kv_heads), ("v", "v_proj", info.n_kv_heads)):
                if kind in kinds:
                    mod = getattr(attn, mod_name)
                    out = mod.output
                    new = process(kinds[kind], out.reshape(*out.shape[:-1], n, info.d_head))
                    if new is not None:
                        mod.output = new.reshape(out.shape)
            o_proj = attn.o_proj
        if "z" in kinds:
            z_in = o_proj.input
            new = process(kinds["z"], z_in.reshape(*z_in.shape[:-1], b_h, info.d_head))
            if new is not None:
                o_proj.input = new.reshape(z_in.shape)
        attn_out = None
        if "attn_out" in kinds or "pattern" in kinds or "resid_mid" in kinds:
            out = attn.output
            attn_out = out[0]
            if "attn_out" in kinds:
                new = process(kinds["attn_out"], attn_out)
                if new is not None:
                    attn.output = (new, *out[1:])
                    attn_out = new
            if "pattern" in kinds:
                if out[1] is None:
                    raise UserError("caching attention patterns on nnsight needs eager attention")
                process(kinds["pattern"], out[1])
            if "resid_mid" in kinds:
                process(kinds["resid_mid"], resid_pre + attn_out)
        if "mlp_out" in kinds:
            new = process(kinds["mlp_out"], block.mlp.output)
            if new is not None:
                block.mlp.output = new
        if "resid_post" in kinds:
            out = block.output
            x = out[0] if isinstance(out, tuple) else out
            new = process(kinds["resid_post"], x)
            if new is not None:
                block.output = (new, *out[1:]) if isinstance(out, tuple) else new


BACKENDS: Mapping[str, type[Backend]] = {"bridge": BridgeBackend, "nnsight": NNsightBackend}


def make_backend(name: str, model: LoadedModel) -> Backend:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    return BACKENDS[name](model)


@contextlib.contextmanager
def no_hooks_left(model: LoadedModel) -> Iterator[None]:
    """For tests: assert that a block leaves no forward hooks on the HF modules."""
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())
    yield
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())
    if after != before:
        raise AssertionError(f"{after - before} hooks left on the model")


__all__ = ["BACKENDS", "LAYER_KINDS", "Backend", "BridgeBackend", "NNsightBackend", "RunOutput", "make_backend"]
