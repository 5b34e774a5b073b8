"""Edges of a decoder's computational graph as data: senders, receivers, edges, graphs, names.

A **sender** writes into the residual stream:

- ``embed``: everything the residual holds before layer 0 (token embeddings, Gemma's
  sqrt(d_model) scale and GPT-2's position embeddings included);
- a head ``L.H``: its share of the attention output, its slice of the output projection's input
  (z) times its columns of W_O. Under a post-attention norm (Gemma 2/3) the layer adds P(S),
  S the sum of its heads' outputs, so a head has no additive share; its share there is
  P(S + d_h) - P(S) with d_h the change of its own output, the norm recomputed exactly
  (:mod:`interp.patching.senders`);
- ``mlp:L``: the MLP's output as it joins the residual (after Gemma's post-feedforward norm).

A **receiver** reads from it, through its own input norm:

- ``q:L.H``: query head H's query projection at layer L;
- ``k:L.G`` / ``v:L.G``: key / value of kv head G, what the model computes: under grouped-query
  attention every query head of the group reads the edited key or value;
- ``kq:L.H`` / ``vq:L.H`` (the opt-in ``ungrouped`` mode): the key / value as query head H alone
  sees it. The model cannot express this (its heads share one key per group); the engine
  computes head H's output with the edited key or value of its group while the group's other
  query heads keep theirs. A grouped edge equals the ungrouped edges of all its query heads
  together; an ungrouped edge is the per-query-head question (Hanna et al. 2024 and
  TransformerLens ask it by ungrouping the weights);
- ``mlp:L``: the MLP's input (its norm recomputed);
- ``logits``: the final norm's input.

An **edge** is a (sender, receiver) pair with the sender writing before the receiver reads: a
head of layer L feeds the queries, keys and values of layers above L, the MLP of layer L and
above, and the logits; an MLP of layer L feeds layers above L and the logits; ``embed`` feeds
everything. Any other pair is refused (a sender at or after its receiver's layer has no path to
it). Names parse without a model; :meth:`Sender.check` / :meth:`Receiver.check` check them
against a model's shape.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from interp.errors import UserError
from interp.model.layout import ModelInfo

SenderKind = Literal["embed", "head", "mlp"]
ReceiverKind = Literal["q", "k", "v", "kq", "vq", "mlp", "logits"]

SENDER_FORMS = "embed, L.H (a head) or mlp:L"
RECEIVER_FORMS = "q:L.H, k:L.G, v:L.G, kq:L.H, vq:L.H (ungrouped), mlp:L or logits"
HEAD_RECEIVERS = ("q", "k", "v", "kq", "vq")
UNGROUPED = {"k": "kq", "v": "vq"}

_HEAD = re.compile(r"^(\d+)\.(\d+)$")
_MLP = re.compile(r"^mlp:(\d+)$")
_RECEIVER_HEAD = re.compile(r"^(q|k|v|kq|vq):(\d+)\.(\d+)$")


@dataclass(frozen=True)
class Sender:
    """What writes into the residual: ``embed``, a head (layer, head) or an MLP (layer)."""

    kind: SenderKind
    layer: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        ok = {
            "embed": self.layer is None and self.head is None,
            "head": self.layer is not None and self.head is not None,
            "mlp": self.layer is not None and self.head is None,
        }
        if self.kind not in ok or not ok[self.kind]:
            raise UserError(f"malformed sender {self.kind}/{self.layer}/{self.head} (senders: {SENDER_FORMS})")
        if (self.layer is not None and self.layer < 0) or (self.head is not None and self.head < 0):
            raise UserError(f"sender {self.name}: negative index")

    @property
    def name(self) -> str:
        if self.kind == "embed":
            return "embed"
        return f"{self.layer}.{self.head}" if self.kind == "head" else f"mlp:{self.layer}"

    def __str__(self) -> str:
        return self.name

    @property
    def writes_at(self) -> tuple[float, float]:
        """(layer, stage) at which it writes: embed before layer 0, a head after its layer's
        attention, an MLP after its layer's MLP."""
        if self.kind == "embed":
            return (-1.0, 0.0)
        return (float(self.layer or 0), 0.5 if self.kind == "head" else 1.5)

    def sort_key(self) -> tuple[float, float, int]:
        return (*self.writes_at, self.head if self.head is not None else -1)

    def check(self, info: ModelInfo) -> None:
        """A UserError when the model has no such layer or head."""
        if self.layer is not None and self.layer >= info.n_layers:
            raise UserError(f"sender {self.name}: layer {self.layer} out of range (0..{info.n_layers - 1})")
        if self.head is not None and self.head >= info.n_heads:
            raise UserError(f"sender {self.name}: head {self.head} out of range (0..{info.n_heads - 1})")


@dataclass(frozen=True)
class Receiver:
    """What reads from the residual: a head's q, k, v (grouped or ungrouped), an MLP or the logits.

    ``head`` is a query head for ``q``, ``kq`` and ``vq``, a kv head for ``k`` and ``v``.
    """

    kind: ReceiverKind
    layer: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        ok = self.kind in HEAD_RECEIVERS and self.layer is not None and self.head is not None
        ok = ok or (self.kind == "mlp" and self.layer is not None and self.head is None)
        ok = ok or (self.kind == "logits" and self.layer is None and self.head is None)
        if not ok:
            raise UserError(f"malformed receiver {self.kind}/{self.layer}/{self.head} (receivers: {RECEIVER_FORMS})")
        if (self.layer is not None and self.layer < 0) or (self.head is not None and self.head < 0):
            raise UserError(f"receiver {self.name}: negative index")

    @property
    def name(self) -> str:
        if self.kind == "logits":
            return "logits"
        if self.kind == "mlp":
            return f"mlp:{self.layer}"
        return f"{self.kind}:{self.layer}.{self.head}"

    def __str__(self) -> str:
        return self.name

    @property
    def ungrouped(self) -> bool:
        return self.kind in ("kq", "vq")

    @property
    def projection(self) -> Literal["q", "k", "v"] | None:
        """Which projection of its layer it reads through (None for an MLP or the logits)."""
        if self.kind in HEAD_RECEIVERS:
            return "q" if self.kind == "q" else ("k" if self.kind in ("k", "kq") else "v")
        return None

    @property
    def reads_at(self) -> tuple[float, float]:
        """(layer, stage) at which it reads: q/k/v before their layer's attention, an MLP before
        its layer's MLP, the logits after the last layer."""
        if self.kind == "logits":
            return (float("inf"), 0.0)
        return (float(self.layer or 0), 1.0 if self.kind == "mlp" else 0.0)

    def layer_in(self, info: ModelInfo) -> int:
        """The decoder layer whose forward pass holds it (the last one for the logits)."""
        return info.n_layers - 1 if self.layer is None else self.layer

    def sort_key(self) -> tuple[float, float, int, int]:
        order = ("q", "k", "v", "kq", "vq", "mlp", "logits").index(self.kind)
        return (*self.reads_at, order, self.head if self.head is not None else -1)

    def kv_head(self, info: ModelInfo) -> int:
        """The kv head whose key or value it reads (k/v: its own index; kq/vq: its query head's group)."""
        if self.kind in ("k", "v"):
            return int(self.head or 0)
        return int(self.head or 0) // info.group_size

    def check(self, info: ModelInfo) -> None:
        """A UserError when the model has no such layer, query head or kv head."""
        if self.layer is not None and self.layer >= info.n_layers:
            raise UserError(f"receiver {self.name}: layer {self.layer} out of range (0..{info.n_layers - 1})")
        if self.head is None:
            return
        if self.kind in ("k", "v") and self.head >= info.n_kv_heads:
            hint = f"; for query head {self.head}'s view use {UNGROUPED[self.kind]}:{self.layer}.{self.head}" if (
                self.head < info.n_heads) else ""
            raise UserError(f"receiver {self.name}: kv head {self.head} out of range: the model has "
                            f"{info.n_kv_heads} kv heads (0..{info.n_kv_heads - 1}){hint}")
        if self.kind in ("q", "kq", "vq") and self.head >= info.n_heads:
            raise UserError(f"receiver {self.name}: query head {self.head} out of range (0..{info.n_heads - 1})")


def precedes(sender: Sender, receiver: Receiver) -> bool:
    """Whether ``sender`` writes before ``receiver`` reads (an edge can join them)."""
    return sender.writes_at < receiver.reads_at


@dataclass(frozen=True)
class Edge:
    """A sender and a receiver it precedes (a UserError otherwise)."""

    sender: Sender
    receiver: Receiver

    def __post_init__(self) -> None:
        if not precedes(self.sender, self.receiver):
            raise UserError(f"edge {self.sender.name}->{self.receiver.name}: the receiver reads at or before "
                            f"its sender writes (a receiver must be above its sender)")

    @property
    def name(self) -> str:
        return f"{self.sender.name}->{self.receiver.name}"

    def __str__(self) -> str:
        return self.name

    def check(self, info: ModelInfo) -> None:
        self.sender.check(info)
        self.receiver.check(info)


def parse_sender(text: str | Sender) -> Sender:
    """``embed``, ``L.H`` (a head) or ``mlp:L``; a one-line UserError otherwise."""
    if isinstance(text, Sender):
        return text
    s = str(text).strip()
    if s == "embed":
        return Sender("embed")
    if m := _HEAD.match(s):
        return Sender("head", int(m[1]), int(m[2]))
    if m := _MLP.match(s):
        return Sender("mlp", int(m[1]))
    raise UserError(f"unknown sender {text!r} (senders: {SENDER_FORMS})")


def parse_receiver(text: str | Receiver, *, ungrouped: bool = False) -> Receiver:
    """``q:L.H``, ``k:L.G``, ``v:L.G``, ``kq:L.H``, ``vq:L.H``, ``mlp:L`` or ``logits``; with
    ``ungrouped``, ``k:L.H`` and ``v:L.H`` name query head H's view (``kq``/``vq``)."""
    if isinstance(text, Receiver):
        r = text
    else:
        s = str(text).strip()
        if s == "logits":
            return Receiver("logits")
        if m := _MLP.match(s):
            return Receiver("mlp", int(m[1]))
        m = _RECEIVER_HEAD.match(s)
        if m is None:
            raise UserError(f"unknown receiver {text!r} (receivers: {RECEIVER_FORMS})")
        kind = m[1]
        r = Receiver(kind, int(m[2]), int(m[3]))  # type: ignore[arg-type]
    if ungrouped and r.kind in UNGROUPED:
        r = Receiver(UNGROUPED[r.kind], r.layer, r.head)  # type: ignore[arg-type]
    return r


def parse_edge(text: str | Edge, *, ungrouped: bool = False) -> Edge:
    """``SENDER->RECEIVER`` (``12.4->k:18.2``)."""
    if isinstance(text, Edge):
        return text
    sender, arrow, receiver = str(text).partition("->")
    if not arrow:
        raise UserError(f"malformed edge {text!r}: write SENDER->RECEIVER, e.g. 0.1->k:1.0")
    return Edge(parse_sender(sender), parse_receiver(receiver, ungrouped=ungrouped))


def parse_senders(names: Iterable[str | Sender]) -> tuple[Sender, ...]:
    out = tuple(parse_sender(n) for n in names)
    _no_repeats([s.name for s in out], "sender")
    return out


def parse_receivers(names: Iterable[str | Receiver], *, ungrouped: bool = False) -> tuple[Receiver, ...]:
    out = tuple(parse_receiver(n, ungrouped=ungrouped) for n in names)
    if not out:
        raise UserError("no receivers given")
    _no_repeats([r.name for r in out], "receiver")
    return out


def _no_repeats(names: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise UserError(f"{what} {n} given twice")
        seen.add(n)


def check_pairs(senders: Iterable[Sender], receivers: Iterable[Receiver]) -> None:
    """Every sender must precede every receiver (a UserError naming the first pair that does not)."""
    receivers = tuple(receivers)
    for s in senders:
        for r in receivers:
            Edge(s, r)


def all_senders(info: ModelInfo, *, mlps: bool = True) -> tuple[Sender, ...]:
    """``embed``, every head and (with ``mlps``) every MLP, in the order they write."""
    out = [Sender("embed")]
    for layer in range(info.n_layers):
        out.extend(Sender("head", layer, h) for h in range(info.n_heads))
        if mlps:
            out.append(Sender("mlp", layer))
    return tuple(out)


def all_receivers(info: ModelInfo, *, ungrouped: bool = False, mlps: bool = True) -> tuple[Receiver, ...]:
    """Every q, k, v (per kv head, or per query head with ``ungrouped``), MLP input, and the logits."""
    out: list[Receiver] = []
    kv = info.n_heads if ungrouped else info.n_kv_heads
    k, v = ("kq", "vq") if ungrouped else ("k", "v")
    for layer in range(info.n_layers):
        out.extend(Receiver("q", layer, h) for h in range(info.n_heads))
        out.extend(Receiver(k, layer, g) for g in range(kv))  # type: ignore[arg-type]
        out.extend(Receiver(v, layer, g) for g in range(kv))  # type: ignore[arg-type]
        if mlps:
            out.append(Receiver("mlp", layer))
    out.append(Receiver("logits"))
    return tuple(out)


def senders_before(info: ModelInfo, receivers: Iterable[Receiver], *,
                   kinds: Sequence[SenderKind] = ("embed", "head", "mlp")) -> tuple[Sender, ...]:
    """Every sender of ``kinds`` that precedes every receiver of the set (a detector's default)."""
    receivers = tuple(receivers)
    return tuple(s for s in all_senders(info) if s.kind in kinds and all(precedes(s, r) for r in receivers))


@dataclass(frozen=True)
class Graph:
    """Senders and receivers; its edges are every pair where the sender precedes the receiver."""

    senders: tuple[Sender, ...]
    receivers: tuple[Receiver, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "senders", tuple(sorted(set(self.senders), key=Sender.sort_key)))
        object.__setattr__(self, "receivers", tuple(sorted(set(self.receivers), key=Receiver.sort_key)))

    @property
    def edges(self) -> tuple[Edge, ...]:
        """Receiver-major, in the order the model reads, then senders in the order they write."""
        return tuple(Edge(s, r) for r in self.receivers for s in self.senders if precedes(s, r))

    def check(self, info: ModelInfo) -> None:
        for s in self.senders:
            s.check(info)
        for r in self.receivers:
            r.check(info)

    @property
    def ungrouped(self) -> bool:
        return any(r.ungrouped for r in self.receivers)


def full_graph(info: ModelInfo, *, ungrouped: bool = False, mlps: bool = True) -> Graph:
    """Every sender and receiver of the model (``mlps=False``: attention only, MLPs left out)."""
    return Graph(all_senders(info, mlps=mlps), all_receivers(info, ungrouped=ungrouped, mlps=mlps))


__all__ = [
    "Edge",
    "Graph",
    "Receiver",
    "ReceiverKind",
    "Sender",
    "SenderKind",
    "all_receivers",
    "all_senders",
    "check_pairs",
    "full_graph",
    "parse_edge",
    "parse_receiver",
    "parse_receivers",
    "parse_sender",
    "parse_senders",
    "precedes",
    "senders_before",
]
