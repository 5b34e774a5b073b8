"""Hook backends: run a model with interventions applied and activations cached.

Every backend implements :class:`Backend` over the same named sites and states what else it
can do in its :class:`Capabilities`; callers (the patching engine, decoding) read those flags
and never the backend's class or internals. Two backends:

- ``bridge`` (default): TransformerLens 4's ``TransformerBridge`` over the HF model; its
  hook points give every site, attention scores included; it steps HF's KV cache, passes HF
  forward kwargs through and can start a pass at a layer.
- ``nnsight``: nnsight's ``LanguageModel`` over the HF modules (the route to remote
  execution). Attention scores live inside HF's attention function, so knockout and
  ``scores`` need the bridge; ``pattern`` needs eager attention.

Backends get the HF module, tokenizer, shape and name explicitly (not the LoadedModel), so
this module does not import :mod:`interp.model`. Hooks are always removed when a run ends,
also when the forward pass raises.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from interp.errors import UserError
from interp.model.interventions import Intervention, Sources
from interp.model.layout import ModelInfo, layout_of, walk
from interp.model.sites import LAYER_KINDS, Site, expand_sites, parse_site


@dataclass
class RunOutput:
    logits: torch.Tensor
    cache: dict[str, torch.Tensor] = field(default_factory=dict)
    past_key_values: Any = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond caching and editing the activation sites."""

    kv_cache: bool  # steps HF's KV cache: ``past_key_values`` / ``use_cache`` in ``run``
    attention_scores: bool  # the ``scores`` site (pre-softmax), cached and edited
    attention_patterns: bool  # the ``pattern`` site can be cached
    knockout: bool  # ``Knockout`` interventions (they edit the scores)
    run_from_layer: bool  # ``run_from_layer``: enter a decoder layer with a given residual
    forward_kwargs: bool  # ``forward_kwargs`` reach HF's forward (``logits_to_keep``, ``use_cache``)


def _bridge_call(
    attention_mask: torch.Tensor | None, past_key_values: Any, use_cache: bool, forward_kwargs: Mapping[str, Any] | None
) -> tuple[dict[str, Any], str]:
    """The bridge's forward kwargs and return type for a run (with HF's KV cache or without)."""
    kwargs: dict[str, Any] = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    return_type = "logits"
    if past_key_values is not None or use_cache:
        kwargs["past_key_values"] = past_key_values
        kwargs["use_cache"] = True
        return_type = "logits_and_cache"
    kwargs.update(forward_kwargs or {})
    return kwargs, return_type


def _check_nnsight_sites(groups: Mapping[str, Sequence[Intervention]], to_cache: set[str]) -> None:
    """What the nnsight backend cannot do with a site, refused before the trace starts."""
    for name in set(groups) | to_cache:
        kind = parse_site(name).kind
        if kind == "scores":
            raise UserError("attention scores (and knockout) need the bridge backend")
        if kind in ("pattern", "resid_mid") and name in groups:
            raise UserError(f"site {kind!r} can be cached but not edited on the nnsight backend")


def _group(interventions: Sequence[Intervention], info: ModelInfo) -> dict[str, list[Intervention]]:
    groups: dict[str, list[Intervention]] = defaultdict(list)
    for iv in interventions:
        iv.check(info.n_layers, info.n_heads, info.n_kv_heads)
        groups[str(iv.site)].append(iv)
    return groups


def _cache_sites(cache: Sequence[str | Site], info: ModelInfo) -> set[str]:
    patterns = [str(c) for c in cache]
    return {str(s) for s in expand_sites(patterns, info.n_layers)}


class Backend(ABC):
    """The contract: ``run`` every backend implements; ``run_from_layer`` where
    ``capabilities.run_from_layer`` says so. A capability a backend lacks is a UserError."""

    name: ClassVar[str] = "base"
    capabilities: Capabilities

    def __init__(self, hf: torch.nn.Module, tokenizer: Any, info: ModelInfo, label: str) -> None:
        self.hf = hf
        self.tokenizer = tokenizer
        self.info = info
        self.label = label

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @abstractmethod
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
        """Logits of ``input_ids`` with ``interventions`` applied, and the ``cache`` sites.

        ``forward_kwargs`` go to HF's forward as they are (``logits_to_keep``, ``use_cache``);
        ``past_key_values``/``use_cache`` step HF's KV cache (the ``kv_cache`` capability).
        """

    def run_from_layer(
        self,
        resid: torch.Tensor,
        layer: int,
        *,
        interventions: Sequence[Intervention] = (),
        cache: Sequence[str | Site] = (),
        sources: Sources | None = None,
        grad: bool = False,
        cache_to_cpu: bool = False,
        past_key_values: Any = None,
        use_cache: bool = False,
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> RunOutput:
        """The rest of a pass whose residual entering decoder layer ``layer`` is ``resid``
        [batch, positions, d_model]: layers below it are not computed, and sites there are
        neither cached nor edited. With ``past_key_values`` (the KV cache of earlier
        positions), ``resid`` holds the later positions only."""
        raise UserError(f"the {self.name} backend cannot start a pass at a layer; use backend='bridge'")


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


@contextlib.contextmanager
def _architectures_recorded(hf: torch.nn.Module) -> Iterator[None]:
    """Let TransformerLens pick its adapter for a model built in-process.

    TransformerLens picks its adapter by ``config.architectures``, which only a saved checkpoint
    carries (``save_pretrained`` writes the class name there); for a model built from a config
    it falls back to a table of model types that lacks some (``gemma3_text``). Record the class
    name for the boot only, so the model's own config is left as it came.
    """
    config = getattr(hf, "config", None)
    if config is None or getattr(config, "architectures", None):
        yield
        return
    config.architectures = [type(hf).__name__]
    try:
        yield
    finally:
        config.architectures = None


class BridgeBackend(Backend):
    name = "bridge"

    def __init__(self, hf: torch.nn.Module, tokenizer: Any, info: ModelInfo, label: str) -> None:
        super().__init__(hf, tokenizer, info, label)
        from transformer_lens.model_bridge import TransformerBridge

        # The bridge re-loads a tokenizer from its name unless told BOS handling is settled;
        # that reload would reach for the hub. We always feed it token ids, so give it a copy
        # marked as settled.
        tok = copy.copy(tokenizer)
        tok.init_kwargs = {**tok.init_kwargs, "add_bos_token": True}
        tok.init_kwargs.setdefault("name_or_path", label)
        with contextlib.redirect_stdout(None), _architectures_recorded(hf):
            self.bridge = TransformerBridge.boot_transformers(
                _bridge_label(label), hf_model=hf, tokenizer=tok, device=str(self.device)
            )
        self.bridge.eval()
        self.capabilities = Capabilities(
            kv_cache=True, attention_scores=True, attention_patterns=True, knockout=True,
            run_from_layer=hasattr(self.bridge, "blocks"), forward_kwargs=True,
        )
        # Whether a decoder block returns a tuple: the blocks skipped by run_from_layer must
        # return what the HF decoder loop expects. Learnt from the first full pass.
        self._block_tuple_out: bool | None = None

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
        with self._learn_block_output():
            return self._forward(
                input_ids, interventions=interventions, cache=cache, sources=sources,
                attention_mask=attention_mask, grad=grad, cache_to_cpu=cache_to_cpu,
                past_key_values=past_key_values, use_cache=use_cache, forward_kwargs=forward_kwargs,
            )

    def run_from_layer(
        self,
        resid: torch.Tensor,
        layer: int,
        *,
        interventions: Sequence[Intervention] = (),
        cache: Sequence[str | Site] = (),
        sources: Sources | None = None,
        grad: bool = False,
        cache_to_cpu: bool = False,
        past_key_values: Any = None,
        use_cache: bool = False,
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> RunOutput:
        # The bridge's start_at_layer swaps ``resid`` in at block ``layer``; the blocks below
        # still run unless made pass-throughs, and their result would be discarded.
        if self._block_tuple_out is None:
            self.run(torch.zeros((1, 1), dtype=torch.long, device=self.device))
        with _skip_blocks(self.bridge, layer, bool(self._block_tuple_out)):
            return self._forward(
                resid, interventions=interventions, cache=cache, sources=sources, grad=grad,
                cache_to_cpu=cache_to_cpu, past_key_values=past_key_values, use_cache=use_cache,
                forward_kwargs={**(forward_kwargs or {}), "start_at_layer": layer},
            )

    def _learn_block_output(self) -> contextlib.AbstractContextManager[None]:
        if self._block_tuple_out is not None or not self.capabilities.run_from_layer:
            return contextlib.nullcontext()

        def hook(_mod: Any, _args: Any, output: Any) -> None:
            self._block_tuple_out = isinstance(output, tuple)

        return _removing(self.bridge.blocks[0].register_forward_hook(hook))

    def _forward(
        self,
        input_ids: torch.Tensor,
        *,
        interventions: Sequence[Intervention],
        cache: Sequence[str | Site],
        sources: Sources | None,
        grad: bool,
        cache_to_cpu: bool,
        past_key_values: Any,
        use_cache: bool,
        forward_kwargs: Mapping[str, Any] | None,
        attention_mask: torch.Tensor | None = None,
    ) -> RunOutput:
        # A float residual stands in for input_ids under start_at_layer.
        groups = _group(interventions, self.info)
        to_cache = _cache_sites(cache, self.info)
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
        kwargs, return_type = _bridge_call(attention_mask, past_key_values, use_cache, forward_kwargs)
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


@contextlib.contextmanager
def _skip_blocks(bridge: Any, n: int, tuple_out: bool) -> Iterator[None]:
    """Make blocks 0..n-1 return their input unchanged: their result would be discarded anyway
    when block n swaps in the given residual."""

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if tuple_out else h

    blocks = list(bridge.blocks)[:n]
    for block in blocks:
        # object.__setattr__: the bridge's components forward attribute writes to the wrapped
        # HF module, which would leave the HF layer short-circuited after the run.
        object.__setattr__(block, "forward", passthrough)
    try:
        yield
    finally:
        for block in blocks:
            if "forward" in block.__dict__:
                del block.__dict__["forward"]


class _removing(contextlib.AbstractContextManager[None]):
    """Remove a hook handle on exit."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


class NNsightBackend(Backend):
    name = "nnsight"
    capabilities = Capabilities(
        kv_cache=False, attention_scores=False, attention_patterns=True, knockout=False,
        run_from_layer=False, forward_kwargs=False,
    )

    def __init__(self, hf: torch.nn.Module, tokenizer: Any, info: ModelInfo, label: str) -> None:
        super().__init__(hf, tokenizer, info, label)
        from nnsight import LanguageModel

        self.layout = layout_of(hf)
        self.lm = LanguageModel(hf, tokenizer=tokenizer)

    def _envoy(self, role: str, layer: int | None = None) -> Any:
        """nnsight's proxy of the module at ``role`` (the layout's path, walked on the envoys)."""
        return walk(self.lm, self.layout.path(role, layer))

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
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> RunOutput:
        import nnsight

        if past_key_values is not None or use_cache:
            raise UserError("the nnsight backend does not step a KV cache here; use backend='bridge'")
        if forward_kwargs:
            raise UserError("the nnsight backend takes no forward_kwargs; use backend='bridge'")
        groups = _group(interventions, self.info)
        to_cache = _cache_sites(cache, self.info)
        _check_nnsight_sites(groups, to_cache)
        srcs: Sources = sources or {}
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
                emb = self._envoy("embed")
                new = process("embed", emb.output)
                if new is not None:
                    emb.output = new
            for layer in sorted(by_layer):
                names = sorted(by_layer[layer], key=lambda n: self._ORDER.index(parse_site(n).kind))
                self._run_layer(layer, names, process)
            logits = nnsight.save(self.lm.output.logits)
        return RunOutput(logits=logits, cache=store)

    def _run_layer(self, layer: int, names: list[str], process: Any) -> None:
        # nnsight reads and writes module values in execution order: keep the steps in it.
        block = self._envoy("layer", layer)
        kinds = {parse_site(n).kind: n for n in names}
        resid_pre = None
        if "resid_pre" in kinds or "resid_mid" in kinds:
            resid_pre = block.input
            new = process(kinds["resid_pre"], resid_pre) if "resid_pre" in kinds else None
            if new is not None:
                block.input = new
                resid_pre = new
        self._qkv(layer, kinds, process)
        if "z" in kinds:
            o_proj = self._envoy("o", layer)
            z_in = o_proj.input
            new = process(kinds["z"], z_in.reshape(*z_in.shape[:-1], self.info.n_heads, self.info.d_head))
            if new is not None:
                o_proj.input = new.reshape(z_in.shape)
        if "attn_out" in kinds or "pattern" in kinds or "resid_mid" in kinds:
            self._attn_out(layer, kinds, process, resid_pre)
        if "mlp_out" in kinds:
            # What the MLP adds to the residual: after its post-norm where the family has one.
            mlp = self._envoy(self.layout.out_role("mlp"), layer)
            new = process(kinds["mlp_out"], mlp.output)
            if new is not None:
                mlp.output = new
        if "resid_post" in kinds:
            out = block.output
            x = out[0] if isinstance(out, tuple) else out
            new = process(kinds["resid_post"], x)
            if new is not None:
                block.output = (new, *out[1:]) if isinstance(out, tuple) else new

    def _attn_out(self, layer: int, kinds: Mapping[str, str], process: Any, resid_pre: Any) -> None:
        """The pattern, attn_out and resid_mid sites. attn_out is what attention adds to the
        residual: the attention module's output, or its post-norm's where the family has one
        (Gemma), as TransformerLens places hook_attn_out; so resid_mid = resid_pre + attn_out."""
        attn = self._envoy("attn", layer)
        out = attn.output  # read first: the post-norm runs after the attention module
        if "pattern" in kinds:
            if out[1] is None:
                raise UserError("caching attention patterns on nnsight needs eager attention")
            process(kinds["pattern"], out[1])
        if "attn_out" not in kinds and "resid_mid" not in kinds:
            return
        direct = self.layout.attn_out_direct
        post = None if direct else self._envoy("attn_post_norm", layer)
        attn_out = out[0] if post is None else post.output
        if "attn_out" in kinds:
            new = process(kinds["attn_out"], attn_out)
            if new is not None:
                if post is None:
                    attn.output = (new, *out[1:])
                else:
                    post.output = new
                attn_out = new
        if "resid_mid" in kinds:
            process(kinds["resid_mid"], resid_pre + attn_out)

    def _qkv(self, layer: int, kinds: Mapping[str, str], process: Any) -> None:
        """The q, k and v sites, per head, from separate projections or one fused output."""
        info = self.info
        heads = {"q": info.n_heads, "k": info.n_kv_heads, "v": info.n_kv_heads}
        if not any(k in kinds for k in heads):
            return
        if not self.layout.fused_qkv:
            for kind, n in heads.items():
                if kind in kinds:
                    mod = self._envoy(kind, layer)
                    out = mod.output
                    new = process(kinds[kind], out.reshape(*out.shape[:-1], n, info.d_head))
                    if new is not None:
                        mod.output = new.reshape(out.shape)
            return
        fused = self._envoy("qkv", layer)
        parts = list(fused.output.split(list(self.layout.qkv_sizes(info)), dim=-1))
        for i, (kind, n) in enumerate(heads.items()):
            if kind in kinds:
                x = parts[i].reshape(*parts[i].shape[:-1], n, info.d_head)
                new = process(kinds[kind], x)
                if new is not None:
                    parts[i] = new.reshape(parts[i].shape)
        fused.output = torch.cat(parts, dim=-1)


BACKENDS: Mapping[str, type[Backend]] = {"bridge": BridgeBackend, "nnsight": NNsightBackend}


def make_backend(name: str, hf: torch.nn.Module, tokenizer: Any, info: ModelInfo, label: str) -> Backend:
    """The backend ``name`` over ``hf``; ``label`` names the model (the bridge records it)."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    return BACKENDS[name](hf, tokenizer, info, label)


__all__ = [
    "BACKENDS",
    "LAYER_KINDS",
    "Backend",
    "BridgeBackend",
    "Capabilities",
    "NNsightBackend",
    "RunOutput",
    "make_backend",
]
