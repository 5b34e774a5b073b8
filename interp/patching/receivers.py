"""What a receiver computes from its input, recomputed on an edited input (norms included).

A receiver's *input* is the residual stream where it reads: ``resid_pre.L`` for the q, k and v
of layer L, ``resid_mid.L`` (= ``resid_pre.L + attn_out.L``) for the MLP of layer L, and the
last layer's ``resid_post`` for the logits. Its *activation* is what the model computes from
that input and what the engine writes at a site of the forward pass:

- ``q:L.H``: head H's slice of the query projection of the attention input norm, at site
  ``q.L`` (before rotary and Gemma's QK-norm, which the model then applies);
- ``k:L.G`` / ``v:L.G``: kv head G's slice of the key / value projection, at ``k.L`` / ``v.L``;
  ``kq:L.H`` / ``vq:L.H`` compute the same slice for query head H's group;
- ``mlp:L``: the MLP on its input norm (and Gemma's post-feedforward norm), at ``mlp_out.L``;
- ``logits``: the input itself, at the last ``resid_post`` (the final norm follows).

Every norm is the model's own module called on the edited input; the projections are their
weight rows (and bias) for that head, so a receiver costs one head's projection, not the
layer's. :meth:`ReceiverMaps.check` compares these maps with a run's cached sites once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from interp.errors import UserError
from interp.model.layout import tensor_of
from interp.model.loaded import LoadedModel
from interp.patching.edges import Receiver


@contextlib.contextmanager
def _class_forwards(module: torch.nn.Module) -> Iterator[None]:
    """Let ``module`` and its children run their class's forward: a hook backend may replace
    a module's forward on the instance (nnsight does), and refuses a module re-entered from
    inside its own hook."""
    saved = {m: m.__dict__.pop("forward") for m in module.modules() if "forward" in m.__dict__}
    try:
        yield
    finally:
        for m, f in saved.items():
            m.__dict__["forward"] = f


def plain_call(module: torch.nn.Module, *args: Any) -> Any:
    """Call an HF module as plain torch, inside or outside a hooked forward pass (its hooks
    do not fire)."""
    with _class_forwards(module):
        return module.forward(*args)


def input_sites(receiver: Receiver, n_layers: int) -> tuple[str, ...]:
    """The sites whose sum is the receiver's input (the MLP's: ``resid_pre`` + ``attn_out``,
    which both backends can tap)."""
    if receiver.kind == "logits":
        return (f"resid_post.{n_layers - 1}",)
    if receiver.kind == "mlp":
        return (f"resid_pre.{receiver.layer}", f"attn_out.{receiver.layer}")
    return (f"resid_pre.{receiver.layer}",)


def input_key(receiver: Receiver, n_layers: int) -> str:
    """A name for the receiver's input, shared by every receiver reading the same stream."""
    if receiver.kind == "logits":
        return f"resid_post.{n_layers - 1}"
    return f"resid_mid.{receiver.layer}" if receiver.kind == "mlp" else f"resid_pre.{receiver.layer}"


def write_site(receiver: Receiver, n_layers: int) -> str:
    """The site where the engine writes the receiver's activation."""
    if receiver.kind == "logits":
        return f"resid_post.{n_layers - 1}"
    if receiver.kind == "mlp":
        return f"mlp_out.{receiver.layer}"
    return f"{receiver.projection}.{receiver.layer}"


def read_input(receiver: Receiver, acts: Mapping[str, torch.Tensor], n_layers: int) -> torch.Tensor:
    """The receiver's input from activations of a run (cached or tapped), [rows, p, d]."""
    sites = input_sites(receiver, n_layers)
    x = acts[sites[0]]
    return x + acts[sites[1]] if len(sites) == 2 else x


class ReceiverMaps:
    """The maps from a receiver's input to its activation, on the model's device and dtype."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.info = model.info
        self._proj: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def slot(self, receiver: Receiver) -> int:
        """The head index of its write site: the query head (q), else the kv head."""
        return int(receiver.head or 0) if receiver.kind == "q" else receiver.kv_head(self.info)

    def _projection(self, layer: int, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [heads * d_head, d_model], bias or None) of the q, k or v projection."""
        key = (layer, which)
        if key not in self._proj:
            layout, hf, info = self.model.layout, self.model.hf, self.info
            if layout.fused_qkv:
                start = {"q": 0, "k": info.n_heads, "v": info.n_heads + info.n_kv_heads}[which] * info.d_head
                width = layout.qkv_sizes(info)[("q", "k", "v").index(which)]
                mod = layout.module(hf, "qkv", layer)
                w = layout.weight(hf, "qkv", layer)[start : start + width]
            else:
                mod = layout.module(hf, which, layer)
                w, start, width = layout.weight(hf, which, layer), 0, None
            bias = getattr(mod, "bias", None)
            b = None if bias is None else tensor_of(mod, "bias")[start : start + (width or bias.shape[0])]
            dev, dt = self.model.device, self.model.dtype
            self._proj[key] = (w.to(dev, dt), None if b is None else b.to(dev, dt))
        return self._proj[key]

    def head_value(self, receiver: Receiver, x: torch.Tensor) -> torch.Tensor:
        """A q/k/v receiver's head slice [rows, p, d_head] computed from its input x [rows, p, d]."""
        layer = int(receiver.layer or 0)
        norm = self.model.layout.module(self.model.hf, "attn_norm", layer)
        w, b = self._projection(layer, str(receiver.projection))
        e = self.info.d_head
        h = self.slot(receiver)
        out = plain_call(norm, x) @ w[h * e : (h + 1) * e].T
        return out if b is None else out + b[h * e : (h + 1) * e]

    def mlp_value(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output as it joins the residual, from its input x (resid_mid)."""
        layout, hf = self.model.layout, self.model.hf
        if layout.mlp_norm is None:
            raise UserError(f"the {layout.family} layout names no MLP input norm: MLP receivers are unsupported")
        out = plain_call(layout.module(hf, "mlp", layer), plain_call(layout.module(hf, "mlp_norm", layer), x))
        if layout.mlp_post_norm is not None:
            out = plain_call(layout.module(hf, "mlp_post_norm", layer), out)
        return out

    def write(self, receiver: Receiver, site_value: torch.Tensor, x: torch.Tensor) -> None:
        """Write the receiver's activation computed from input x into ``site_value`` (in place;
        the rows of x)."""
        if receiver.kind == "logits":
            site_value.copy_(x)
        elif receiver.kind == "mlp":
            site_value.copy_(self.mlp_value(int(receiver.layer or 0), x))
        else:
            site_value[:, :, self.slot(receiver)] = self.head_value(receiver, x)

    def check(self, receivers: Sequence[Receiver], acts: Mapping[str, torch.Tensor]) -> float:
        """Max relative error of the maps against the sites of a run (one receiver of each kind
        and layer); a UserError when they disagree, so no result rests on a wrong map."""
        n = self.info.n_layers
        worst = 0.0
        seen: set[tuple[str | None, int]] = set()
        for r in receivers:
            key = (r.projection or r.kind, r.layer_in(self.info))
            if key in seen or r.kind == "logits":
                continue
            seen.add(key)
            x = read_input(r, acts, n)
            site = acts[write_site(r, n)]
            got = site.clone()
            with torch.no_grad():
                self.write(r, got, x)
            err = float((got - site).abs().max() / max(1.0, float(site.abs().max())))
            worst = max(worst, err)
            tol = 1e-9 if site.dtype == torch.float64 else 1e-3
            if err > tol:
                raise UserError(f"{self.model.name}: receiver {r.name} recomputed from its input differs from the "
                                f"model's own site {write_site(r, n)} (relative error {err:.2g}); path patching "
                                f"does not support this architecture")
        return worst


__all__ = ["ReceiverMaps", "input_key", "input_sites", "plain_call", "read_input", "write_site"]
