"""Interventions that let a forward pass use its own live activations at later sites.

Path patching edits what one receiver reads, not the residual stream every component reads: at
a receiver's site the engine recomputes the receiver's activation from its *own* input (the
live residual where it reads, plus or instead of something), while every other component keeps
reading the live residual. Within one pass this needs the live residual at the receiver's input
sites before the receiver's site runs; both hook backends run the sites of a layer in the order
the model does (``resid_pre``, q/k/v, z, ``attn_out``, ``mlp_out``, ``resid_post``), so a
:class:`Tap` at the input site records it and a :class:`WriteReceivers` at the write site reads it.

Rows of a pass may come in ``copies``: copy 0 holds the real rows, each further copy the helper
rows of an ungrouped receiver (``kq``/``vq``): there the group's key or value is edited for
every head, and :class:`CopyHeads` hands the one query head's output (z) to every other copy, so
that head alone sees the edit.

These interventions hold live state and callables: they are for one pass of the engine, never
stored or serialised (``to_dict`` refuses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from interp.model.interventions import Intervention, Sources
from interp.model.sites import Site, parse_site
from interp.patching.edges import Receiver
from interp.patching.receivers import ReceiverMaps, read_input

# (receiver, copy, its live input [rows, p, d]) -> the input it reads in this pass [rows, p, d]
InputFn = Callable[[Receiver, int, torch.Tensor], torch.Tensor]


class LiveActs:
    """The activations one pass has tapped so far, by site name."""

    def __init__(self) -> None:
        self.acts: dict[str, torch.Tensor] = {}


@dataclass(frozen=True, eq=False)
class _Live(Intervention):
    op: ClassVar[str] = "live"
    site_name: str

    @property
    def site(self) -> Site:
        return parse_site(self.site_name)

    def to_dict(self) -> dict[str, Any]:
        raise TypeError(f"{type(self).__name__} acts within one pass of the engine and is not stored")


@dataclass(frozen=True, eq=False)
class Tap(_Live):
    """Record the site's live value (after the edits listed before it at this site)."""

    live: LiveActs

    def apply(self, x: torch.Tensor, sources: Sources) -> torch.Tensor:
        self.live.acts[self.site_name] = x
        return x


@dataclass(frozen=True, eq=False)
class WriteReceivers(_Live):
    """At a write site: each receiver's activation recomputed from the input ``input_fn`` gives
    it (from its live input), in the rows of ``copies`` (a pass's rows are ``n_copies`` blocks)."""

    receivers: tuple[Receiver, ...]
    copies: tuple[int, ...]
    n_copies: int
    maps: ReceiverMaps
    live: LiveActs
    input_fn: InputFn

    def apply(self, x: torch.Tensor, sources: Sources) -> torch.Tensor:
        n_layers = self.maps.info.n_layers
        rows = x.shape[0] // self.n_copies
        for r in self.receivers:
            # The logits read the very site they are written at: its value before any write.
            acts = {**self.live.acts, self.site_name: x.clone()} if r.kind == "logits" else self.live.acts
            live_in = read_input(r, acts, n_layers)
            for c in self.copies:
                part = slice(c * rows, (c + 1) * rows)
                self.maps.write(r, x[part], self.input_fn(r, c, live_in[part]))
        return x


@dataclass(frozen=True, eq=False)
class CopyHeads(_Live):
    """At z of a layer: every copy but ``source`` takes query ``heads``' outputs from copy ``source``."""

    heads: tuple[int, ...]
    source: int
    n_copies: int

    def apply(self, x: torch.Tensor, sources: Sources) -> torch.Tensor:
        rows = x.shape[0] // self.n_copies
        view = x.view(self.n_copies, rows, *x.shape[1:])
        src = view[self.source][:, :, list(self.heads)].clone()
        for c in range(self.n_copies):
            if c != self.source:
                view[c][:, :, list(self.heads)] = src
        return x


__all__ = ["CopyHeads", "InputFn", "LiveActs", "Tap", "WriteReceivers"]
