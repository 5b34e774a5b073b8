"""A plain transformers causal LM, run with head interventions by torch hooks: DeCoRe (and any
decoding loop of :mod:`circuits.methods.decoding`) on a model object a user already has.

:class:`HFRunner` gives the part of :class:`interp.model.loaded.LoadedModel` that decoding uses
(``run``, ``encode``, the tokenizer, the checks) over an unwrapped Hugging Face model: no
TransformerLens bridge (which rewires the module tree in place), no copy of the weights and no
patched model class (DeCoRe's reference patches each architecture's attention class).
Interventions are the same data as everywhere (:mod:`interp.model.interventions`) and are
applied on two sites, found through :mod:`interp.model.layout`:

- ``z.L`` (query heads' outputs): a forward pre-hook on the output projection, whose input is
  z with the heads concatenated;
- ``q.L`` (queries before the rotary embedding): a forward hook on the query projection's
  output (the first n_heads x d_head outputs of a fused qkv projection). Zeroing q there gives
  what zeroing it after Gemma's q-norm gives (the norm of zero is zero), so DeCoRe's uniform
  mask is the same.

Position ids follow the attention mask (left padding), as ``generate`` computes them. Hooks are
removed after every pass, also when it raises.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from interp.errors import UserError
from interp.model.backends import RunOutput
from interp.model.interventions import Intervention
from interp.model.layout import ModelInfo, layout_of


class HFRunner:
    """Runs ``hf`` (a plain ``...ForCausalLM``) with z and q interventions; the tokenizer's own
    special tokens play the role of a LoadedModel's prompt prefix in :meth:`encode`.

    ``last_logits_only``: return the logits of the last position alone ([batch, 1, vocab]),
    which is all a decoding step reads (a large vocabulary makes the others costly).
    """

    def __init__(self, hf: Any, tokenizer: Any, *, last_logits_only: bool = False) -> None:
        if tokenizer is None:
            raise UserError("a plain Hugging Face model needs its tokenizer (the second argument)")
        if getattr(hf, "training", False):
            raise UserError("the model is in training mode (dropout on): call model.eval() first")
        self.hf = hf
        self.tokenizer = tokenizer
        self.layout = layout_of(hf)
        self.info = ModelInfo.from_config(hf.config)
        self.name = str(getattr(hf, "name_or_path", "") or type(hf).__name__)
        if self.layout.module(hf, "o", 0, live=True) is not self.layout.module(hf, "o", 0):
            raise UserError("this model's modules are wrapped by the TransformerLens bridge (a LoadedModel's .hf): "
                            "pass the LoadedModel itself")
        self.last_logits_only = last_logits_only
        self._keep_arg = "logits_to_keep" in inspect.signature(hf.forward).parameters

    @property
    def device(self) -> torch.device:
        weight = self.hf.get_input_embeddings().weight
        return weight.device if weight.device.type != "meta" else self.hf.device

    def check_head(self, layer: int, head: int) -> None:
        self.info.check_head(layer, head, self.name)

    def check_length(self, n_tokens: int) -> None:
        self.info.check_length(n_tokens, self.name)

    def encode(self, text: str, prefix: bool = True) -> list[int]:
        """A text's token ids as the tokenizer gives them, with its special tokens (a BOS, for
        tokenizers that add one) unless ``prefix`` is False."""
        return [int(i) for i in self.tokenizer(text, add_special_tokens=prefix)["input_ids"]]

    def run(
        self,
        input_ids: torch.Tensor,
        *,
        interventions: Sequence[Intervention] = (),
        cache: Sequence[str] = (),
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> RunOutput:
        """One forward pass with ``interventions`` (z and q sites only); with ``use_cache`` or a
        ``past_key_values`` it steps HF's KV cache."""
        if cache:
            raise UserError("the plain-model runner records no activations; load the model with interp.load_model")
        ids = input_ids.to(self.device)
        kwargs: dict[str, Any] = {"input_ids": ids}
        if attention_mask is not None:
            mask = attention_mask.to(self.device)
            # As generate: a token's position counts the real tokens before it (left padding).
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            kwargs.update(attention_mask=mask, position_ids=positions[:, -ids.shape[1]:])
        if use_cache or past_key_values is not None:
            kwargs.update(use_cache=True, past_key_values=past_key_values)
        if self.last_logits_only and self._keep_arg:
            kwargs["logits_to_keep"] = 1
        with torch.no_grad(), self._hooks(interventions):
            out = self.hf(**kwargs)
        logits = out.logits[:, -1:] if self.last_logits_only else out.logits
        return RunOutput(logits=logits, past_key_values=out.past_key_values if "use_cache" in kwargs else None)

    @contextlib.contextmanager
    def _hooks(self, interventions: Sequence[Intervention]) -> Iterator[None]:
        groups: dict[tuple[str, int], list[Intervention]] = defaultdict(list)
        for iv in interventions:
            iv.check(self.info.n_layers, self.info.n_heads, self.info.n_kv_heads)
            site = iv.site
            if site.kind not in ("z", "q") or site.layer is None:
                raise UserError(f"the plain-model runner edits the z and q sites only, not {site}")
            groups[(site.kind, site.layer)].append(iv)
        handles = []
        try:
            for (kind, layer), ivs in groups.items():
                if kind == "z":
                    handles.append(self.layout.module(self.hf, "o", layer).register_forward_pre_hook(self._z_hook(ivs)))
                else:
                    role = "qkv" if self.layout.fused_qkv else "q"
                    handles.append(self.layout.module(self.hf, role, layer).register_forward_hook(self._q_hook(ivs)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _z_hook(self, ivs: Sequence[Intervention]) -> Any:
        shape = (self.info.n_heads, self.info.d_head)

        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            z = args[0].unflatten(-1, shape).clone()
            for iv in ivs:
                z = iv.apply(z, {})
            return (z.flatten(-2), *args[1:])

        return hook

    def _q_hook(self, ivs: Sequence[Intervention]) -> Any:
        width = self.info.n_heads * self.info.d_head
        shape = (self.info.n_heads, self.info.d_head)

        def hook(_module: torch.nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            q = output[..., :width].unflatten(-1, shape).clone()
            for iv in ivs:
                q = iv.apply(q, {})
            return torch.cat([q.flatten(-2), output[..., width:]], dim=-1)

        return hook


__all__ = ["HFRunner"]
