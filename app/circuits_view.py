"""The Circuits page's data and figure: a run's stored edges as typed values, where each node of
the graph sits, the plotly figure, a head's strongest edges, and the graph's JSON export.

Plain functions of the stored ``edges`` artifact (a list of ``{sender, receiver, score,
attribution, in_circuit}``, and the score's interval ``lo``, ``hi``, ``n``, ``method`` where the
run stored one), with no Streamlit, store or model, so the pages stay a thin view.
Names are parsed by :mod:`interp.patching.edges`. The layout: x = layer, y = head; a head
(sender, and receiver of its own q and of its ungrouped ``kq``/``vq``) at (L, H); a kv head's
``k``/``v`` receiver just left of its layer, at the middle of its group's query heads; MLPs in a
row below the heads, just right of their layer's heads (an MLP reads after its layer's
attention); ``embed`` on the left and ``logits`` on the right, at mid height.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import plotly.graph_objects as go

from interp.errors import UserError
from interp.model.layout import ModelInfo
from interp.patching.edges import Edge, Receiver, Sender, parse_receiver, parse_sender

EDGE_KEYS = ("sender", "receiver", "score", "attribution", "in_circuit")
# The score's 95 % interval over prompt pairs: stored by runs made since intervals were added.
INTERVAL_KEYS = ("lo", "hi", "n", "method")
NodeKind = Literal["embed", "head", "kv", "mlp", "logits"]
ValueName = Literal["score", "attribution"]

POSITIVE = "#2166ac"  # blue: the value is >= 0
NEGATIVE = "#b2182b"  # red: the value is < 0
# Line style by what the receiver reads through (ungrouped kq/vq as their projection k/v).
DASH = {"q": "solid", "k": "dash", "v": "dot", "mlp": "dashdot", "logits": "solid"}
MAX_WIDTH = 8.0  # the line width of the edge with the largest |value|
KV_DX = 0.3  # a kv head's receiver sits this far left of its layer
MLP_DX = 0.45  # an MLP sits this far right of its layer's heads
MLP_Y = -1.5  # the row of the MLPs, below head 0
FADED = 0.25  # the opacity of edges outside the circuit when every edge is shown


@dataclass(frozen=True)
class ScoreInterval:
    """A stored score's 95 % interval: bounds (None where the method has none, as from one
    pair, or where there is no score), the pairs it rests on and the method."""

    lo: float | None
    hi: float | None
    n: int | None
    method: str | None

    def record(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "n": self.n, "method": self.method}

    def text(self) -> str:
        """``95% CI lo to hi (n=…, method)``, or what is missing."""
        if self.lo is None or self.hi is None:
            return "no interval" + (f" (n={self.n})" if self.n is not None else "")
        return f"95% CI {self.lo:.4g} to {self.hi:.4g} (n={self.n}, {self.method})"


@dataclass(frozen=True)
class StoredEdge:
    """One stored edge: its sender and receiver (parsed), exact score, attribution, whether the
    run kept it in its circuit, and the score's interval (None for a run that stored none)."""

    sender: Sender
    receiver: Receiver
    score: float | None
    attribution: float | None
    in_circuit: bool
    interval: ScoreInterval | None = None

    @property
    def name(self) -> str:
        return f"{self.sender.name}->{self.receiver.name}"

    def value(self, by: ValueName) -> float | None:
        return self.score if by == "score" else self.attribution

    def record(self) -> dict[str, Any]:
        """The stored shape back (names as written by the detector; the interval's keys only
        where the run stored them)."""
        ci = {} if self.interval is None else self.interval.record()
        return {"sender": self.sender.name, "receiver": self.receiver.name, "score": self.score, **ci,
                "attribution": self.attribution, "in_circuit": self.in_circuit}


@dataclass(frozen=True)
class Shape:
    """What the layout needs of the model: its layers, query heads and query heads per kv head
    (1 where the model's config could not be read: each kv head then sits at its own index)."""

    n_layers: int
    n_heads: int
    group_size: int = 1

    @classmethod
    def of(cls, info: ModelInfo) -> Shape:
        return cls(info.n_layers, info.n_heads, info.group_size)


@dataclass(frozen=True)
class Node:
    """A node of the drawn graph: its id (``embed``, ``L.H``, ``kv:L.G``, ``mlp:L``, ``logits``),
    kind, layer and head (a kv head's index for ``kv``), and position."""

    id: str
    kind: NodeKind
    layer: int | None
    head: int | None
    x: float
    y: float

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "layer": self.layer, "head": self.head, "x": self.x, "y": self.y}


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{what} is {value!r}, not a number or null")
    # NaN (a measured 'undefined', as the store keeps it) has no width or sign to draw.
    return float(value) if math.isfinite(value) else None


def parse_edges(document: Any) -> list[StoredEdge]:
    """The stored ``edges`` artifact as typed edges (keys beyond the five are ignored); a
    one-line UserError naming the first malformed one."""
    if not isinstance(document, list):
        raise UserError(f"the edges artifact is a {type(document).__name__}, not a list of edges")
    out = []
    for i, item in enumerate(document):
        if not isinstance(item, Mapping) or not set(EDGE_KEYS) <= set(item):
            raise UserError(f"stored edge {i} lacks some of {', '.join(EDGE_KEYS)}: {item!r}")
        edge = Edge(parse_sender(str(item["sender"])), parse_receiver(str(item["receiver"])))
        if not isinstance(item["in_circuit"], bool):
            raise UserError(f"stored edge {edge.name}: in_circuit is {item['in_circuit']!r}, not true or false")
        out.append(StoredEdge(edge.sender, edge.receiver, _number(item["score"], f"stored edge {edge.name}: score"),
                              _number(item["attribution"], f"stored edge {edge.name}: attribution"),
                              item["in_circuit"], _interval(item, edge.name)))
    return out


def _interval(item: Mapping[str, Any], name: str) -> ScoreInterval | None:
    """The score's stored interval, None where the edge has none of its keys."""
    if not any(k in item for k in INTERVAL_KEYS):
        return None
    n, method = item.get("n"), item.get("method")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise UserError(f"stored edge {name}: n is {n!r}, not a whole number or null")
    if method is not None and not isinstance(method, str):
        raise UserError(f"stored edge {name}: method is {method!r}, not a string or null")
    return ScoreInterval(_number(item.get("lo"), f"stored edge {name}: lo"),
                         _number(item.get("hi"), f"stored edge {name}: hi"), n, method)


def shape_of(edges: Sequence[StoredEdge], info: ModelInfo | None = None) -> Shape:
    """The model's shape from its config (``info``), else as small as the edges allow."""
    if info is not None:
        return Shape.of(info)
    layers = [e.layer for s in edges for e in (s.sender, s.receiver) if e.layer is not None]
    heads = [e.head for s in edges for e in (s.sender, s.receiver) if e.head is not None]
    return Shape(max(layers, default=0) + 1, max(heads, default=0) + 1)


def sender_node(sender: Sender, shape: Shape) -> Node:
    mid = (shape.n_heads - 1) / 2
    if sender.kind == "embed":
        return Node("embed", "embed", None, None, -1.0, mid)
    layer = int(sender.layer or 0)
    if sender.kind == "mlp":
        return Node(sender.name, "mlp", layer, None, layer + MLP_DX, MLP_Y)
    head = int(sender.head or 0)
    return Node(sender.name, "head", layer, head, float(layer), float(head))


def receiver_node(receiver: Receiver, shape: Shape) -> Node:
    if receiver.kind == "logits":
        return Node("logits", "logits", None, None, float(shape.n_layers), (shape.n_heads - 1) / 2)
    layer = int(receiver.layer or 0)
    if receiver.kind == "mlp":
        return Node(f"mlp:{layer}", "mlp", layer, None, layer + MLP_DX, MLP_Y)
    head = int(receiver.head or 0)
    if receiver.kind in ("k", "v"):
        g = shape.group_size
        return Node(f"kv:{layer}.{head}", "kv", layer, head, layer - KV_DX, head * g + (g - 1) / 2)
    return Node(f"{layer}.{head}", "head", layer, head, float(layer), float(head))


def node_head(node: Node, shape: Shape) -> tuple[int, int] | None:
    """The query head (layer, head) a node opens in Head maps: a head's own; a kv head's first
    query head; None for embed, MLPs and the logits."""
    if node.layer is None or node.head is None:
        return None
    return (node.layer, node.head * shape.group_size if node.kind == "kv" else node.head)


def nodes_of(edges: Iterable[StoredEdge], shape: Shape) -> list[Node]:
    """Every node an edge touches, once, in the order embed, layers (heads, kv heads, MLP), logits."""
    found: dict[str, Node] = {}
    for e in edges:
        for node in (sender_node(e.sender, shape), receiver_node(e.receiver, shape)):
            found.setdefault(node.id, node)
    return sorted(found.values(), key=lambda n: (n.x, n.y, n.id))


def drawn_edges(edges: Sequence[StoredEdge], *, show_all: bool, by: ValueName = "score",
                limit: int | None = None) -> list[StoredEdge]:
    """The edges the figure draws: those with a ``by`` value; only the circuit's unless
    ``show_all`` (or no edge is in the circuit); the ``limit`` strongest by |value|."""
    valued = [e for e in edges if e.value(by) is not None]
    if not show_all and any(e.in_circuit for e in valued):
        valued = [e for e in valued if e.in_circuit]
    valued.sort(key=lambda e: -abs(e.value(by) or 0.0))
    return valued if limit is None else valued[:limit]


def line_width(value: float, scale: float) -> float:
    """Proportional to |value|: MAX_WIDTH at |value| = ``scale`` (the run's largest)."""
    return MAX_WIDTH * abs(value) / scale if scale > 0 else 1.0


def line_colour(value: float) -> str:
    return NEGATIVE if value < 0 else POSITIVE


def line_dash(receiver: Receiver) -> str:
    return DASH[receiver.projection or receiver.kind]


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def edge_hover(e: StoredEdge) -> str:
    ci = f" ({e.interval.text()})" if e.interval is not None and e.score is not None else ""
    return (f"{e.sender.name} → {e.receiver.name}<br>score {_fmt(e.score)}{ci}<br>attribution "
            f"{_fmt(e.attribution)}<br>{'in the circuit' if e.in_circuit else 'outside the circuit'}")


def _edge_traces(edges: Sequence[StoredEdge], shape: Shape, by: ValueName, scale: float) -> list[go.Scatter]:
    traces = []
    any_in = any(e.in_circuit for e in edges)
    for e in edges:
        a, b = sender_node(e.sender, shape), receiver_node(e.receiver, shape)
        value = float(e.value(by) or 0.0)
        traces.append(go.Scatter(
            x=[a.x, b.x], y=[a.y, b.y], mode="lines", name=f"edge {e.name}", showlegend=False, hoverinfo="skip",
            opacity=1.0 if e.in_circuit or not any_in else FADED,
            line={"width": line_width(value, scale), "color": line_colour(value), "dash": line_dash(e.receiver)}))
    # Hover and click on an edge: a marker at its middle (plotly lines hover at their ends only).
    mids = [(sender_node(e.sender, shape), receiver_node(e.receiver, shape)) for e in edges]
    traces.append(go.Scatter(
        x=[(a.x + b.x) / 2 for a, b in mids], y=[(a.y + b.y) / 2 for a, b in mids], mode="markers", name="edges",
        showlegend=False, text=[edge_hover(e) for e in edges], hovertemplate="%{text}<extra></extra>",
        customdata=[[e.sender.name, e.receiver.name] for e in edges],
        marker={"size": 7, "symbol": "circle-open", "color": [line_colour(float(e.value(by) or 0.0)) for e in edges]}))
    return traces


def _legend_traces() -> list[go.Scatter]:
    styles = [("q", "q (query)"), ("k", "k (key)"), ("v", "v (value)"), ("mlp", "MLP input"), ("logits", "logits")]
    out = [go.Scatter(x=[None], y=[None], mode="lines", name=label, legendgroup="style",
                      line={"color": "#555", "dash": DASH[kind], "width": 2}) for kind, label in styles[:4]]
    out += [go.Scatter(x=[None], y=[None], mode="lines", name=label, legendgroup="sign",
                       line={"color": colour, "width": 4}) for colour, label in ((POSITIVE, "> 0"), (NEGATIVE, "< 0"))]
    return out


def graph_figure(edges: Sequence[StoredEdge], shape: Shape, *, by: ValueName = "score",
                 title: str | None = None, scale: float | None = None) -> go.Figure:
    """The graph of ``edges`` (the ones to draw): one line per edge, its width proportional to
    |value| (``scale``: the |value| drawn at MAX_WIDTH, by default the largest here), its colour
    the sign, its style the receiver's projection; nodes as markers (click: open in Head maps)."""
    scale = scale if scale is not None else max((abs(e.value(by) or 0.0) for e in edges), default=0.0)
    nodes = nodes_of(edges, shape)
    fig = go.Figure([*_edge_traces(edges, shape, by, scale), *_legend_traces()])
    colour = {"embed": "#333", "head": "#999", "kv": "#777", "mlp": "#c98b2b", "logits": "#333"}
    symbol = {"embed": "square", "head": "circle", "kv": "diamond", "mlp": "square", "logits": "square"}
    fig.add_trace(go.Scatter(
        x=[n.x for n in nodes], y=[n.y for n in nodes], mode="markers+text", name="nodes", showlegend=False,
        text=[n.id for n in nodes], textposition="top center", customdata=[[n.id] for n in nodes],
        hovertemplate="%{customdata[0]}<extra></extra>",
        marker={"size": 12, "color": [colour[n.kind] for n in nodes], "symbol": [symbol[n.kind] for n in nodes]}))
    ticks = [MLP_Y, *range(shape.n_heads)]
    fig.update_layout(
        title=title or f"edges by {by} (width ∝ |{by}|; blue > 0, red < 0)",
        xaxis={"title": "layer", "tickmode": "array", "tickvals": [-1, *range(shape.n_layers), shape.n_layers],
               "ticktext": ["embed", *map(str, range(shape.n_layers)), "logits"], "zeroline": False},
        yaxis={"title": "head", "tickmode": "array", "tickvals": ticks,
               "ticktext": ["MLP", *map(str, range(shape.n_heads))], "zeroline": False},
        height=max(420, 40 * (shape.n_heads + 3)), hovermode="closest", clickmode="event+select",
        legend={"orientation": "h", "y": -0.15})
    return fig


def selected_heads(points: Iterable[Mapping[str, Any]], edges: Sequence[StoredEdge],
                   shape: Shape) -> list[tuple[str, tuple[int, int]]]:
    """The heads a plotly selection names, as (label, (layer, head)): a clicked node's own, a
    clicked edge's sender and receiver (those that are heads)."""
    by_name = {e.name: e for e in edges}
    out: list[tuple[str, tuple[int, int]]] = []
    for p in points:
        data = p.get("customdata")
        if not isinstance(data, list | tuple):
            continue
        if len(data) == 2 and (e := by_name.get(f"{data[0]}->{data[1]}")) is not None:
            ends = [("sender", sender_node(e.sender, shape)), ("receiver", receiver_node(e.receiver, shape))]
        else:
            ends = [("node", n) for n in nodes_of(edges, shape) if n.id == (data[0] if data else None)]
        for role, node in ends:
            head = node_head(node, shape)
            if head is not None and (label := f"{role} {node.id}") not in dict(out):
                out.append((label, head))
    return out


def graph_heads(edges: Sequence[StoredEdge], shape: Shape) -> list[tuple[int, int]]:
    """Every query head the graph's nodes open in Head maps, by layer then head."""
    return sorted({h for n in nodes_of(edges, shape) if (h := node_head(n, shape)) is not None})


def edge_table(edges: Sequence[StoredEdge]) -> pd.DataFrame:
    """One row per edge; the score's interval as ``lo``, ``hi``, ``n`` beside it where any edge
    has one (its method is in each edge's hover)."""
    columns = list(EDGE_KEYS)
    if any(e.interval is not None for e in edges):
        columns[3:3] = ["lo", "hi", "n"]
    return pd.DataFrame([e.record() for e in edges], columns=columns)


def head_edges(edges: Sequence[StoredEdge], layer: int, head: int, shape: Shape, *, n: int = 5,
               by: ValueName = "score") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(incoming, outgoing): the ``n`` strongest edges by |value| into query head (layer, head)
    (its q, its ungrouped kq/vq, and its kv group's k and v) and out of it."""
    group = head // shape.group_size

    def into(r: Receiver) -> bool:
        if r.layer != layer or r.head is None:
            return False
        return r.head == (group if r.kind in ("k", "v") else head)

    def strongest(rows: list[StoredEdge]) -> pd.DataFrame:
        rows = sorted((e for e in rows if e.value(by) is not None), key=lambda e: -abs(e.value(by) or 0.0))
        return edge_table(rows[:n])

    incoming = strongest([e for e in edges if into(e.receiver)])
    outgoing = strongest([e for e in edges if e.sender.kind == "head" and (e.sender.layer, e.sender.head) == (layer, head)])
    return incoming, outgoing


def export_graph(edges: Sequence[StoredEdge], shape: Shape, *, run_id: int, model: str, detector: str,
                 variant: str, mode: str | None) -> dict[str, Any]:
    """The whole stored graph in the shape docs/path_patching.md ("Graph export") documents."""
    return {
        "run_id": run_id, "model": model, "detector": detector, "variant": variant, "mode": mode,
        "layout": {"n_layers": shape.n_layers, "n_heads": shape.n_heads, "group_size": shape.group_size},
        "nodes": [n.record() for n in nodes_of(edges, shape)],
        "edges": [{**e.record(), "from": sender_node(e.sender, shape).id, "to": receiver_node(e.receiver, shape).id}
                  for e in edges],
    }
