"""Circuits: confirmed edges above a threshold on paths from embed to the logits, and their faithfulness.

A circuit C is a set of edges of a graph. Its *circuit run* is the clean prompt with every edge
of the graph outside C carrying the corrupt run's value: each receiver of the graph reads

    its corrupt-run input + sum over senders s with (s, receiver) in C of (s live - s corrupt),

its norm recomputed, where "live" is the sender's output in this very run (so an edge in C
passes on what reaches its sender through C). Heads of one layer in C go through Gemma's
post-attention norm together (P applied to the corrupt run's S plus their changes), so keeping
every edge gives back the clean run and keeping none the corrupt run, exactly (Conmy et al.
2023 and Hanna et al. 2024 evaluate circuits this way). Receivers outside the graph read the
live residual.

Faithfulness = (m(C) - m(empty)) / (m(full) - m(empty)) on the metric averaged over prompts,
m(full) = the clean run and m(empty) = the corrupt run, with a bootstrap interval over prompt
pairs (:func:`interp.patching.intervals.faithfulness_interval`). It is compared with random
circuits of the same size (:func:`random_circuits`: grown from the logits by default, or
uniform), as rows of the same batched passes; the circuit's percentile among them is reported.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from interp.errors import UserError
from interp.model.interventions import Intervention
from interp.model.layout import ModelInfo
from interp.model.loaded import LoadedModel
from interp.patching.edge_attribution import Confirmation
from interp.patching.edges import Edge, Graph, Receiver, Sender, full_graph
from interp.patching.intervals import faithfulness_interval
from interp.patching.memory import activation_bytes, bytes_per_row, default_budget, units_within
from interp.patching.pairs import PairRuns
from interp.patching.paths import PairPasses, receiver_edits
from interp.patching.receivers import ReceiverMaps, read_input
from interp.patching.senders import SenderMaps
from interp.patching.taps import LiveActs, Tap
from interp.stats import Interval

Baseline = Literal["connected", "uniform"]
BASELINES: tuple[str, ...] = ("connected", "uniform")
Node = tuple[str, int, int]  # ("embed"|"head"|"mlp"|"logits", layer, head); -1 where none


def sender_node(s: Sender) -> Node:
    return (s.kind, -1 if s.layer is None else s.layer, -1 if s.head is None else s.head)


def receiver_nodes(r: Receiver, info: ModelInfo) -> tuple[Node, ...]:
    """The components a receiver feeds: its query head, every head of its kv group, its MLP, or the logits."""
    if r.kind == "logits":
        return (("logits", -1, -1),)
    if r.kind == "mlp":
        return (("mlp", int(r.layer or 0), -1),)
    layer = int(r.layer or 0)
    if r.kind in ("k", "v"):
        g = int(r.head or 0)
        return tuple(("head", layer, h) for h in range(g * info.group_size, (g + 1) * info.group_size))
    return (("head", layer, int(r.head or 0)),)


def connected_to_logits(edges: Sequence[Edge], info: ModelInfo) -> tuple[Edge, ...]:
    """The edges on some path to the logits (one pass from the top: a sender writes before
    every receiver that could make it part of such a path reads)."""
    alive: set[Node] = {("logits", -1, -1)}
    kept: list[Edge] = []
    for e in sorted(edges, key=lambda e: e.receiver.sort_key(), reverse=True):
        if alive.intersection(receiver_nodes(e.receiver, info)):
            kept.append(e)
            alive.add(sender_node(e.sender))
    order = {e: i for i, e in enumerate(edges)}
    return tuple(sorted(kept, key=order.__getitem__))


def fed_from_embed(edges: Sequence[Edge], info: ModelInfo) -> tuple[Edge, ...]:
    """The edges whose sender some path of these edges reaches from ``embed``: in a circuit run
    any other kept edge carries exactly the corrupt value (its sender reads only corrupt inputs)."""
    alive: set[Node] = {("embed", -1, -1)}
    kept: list[Edge] = []
    for e in sorted(edges, key=lambda e: e.sender.sort_key()):
        if sender_node(e.sender) in alive:
            kept.append(e)
            alive.update(receiver_nodes(e.receiver, info))
    order = {e: i for i, e in enumerate(edges)}
    return tuple(sorted(kept, key=order.__getitem__))


def on_paths(edges: Sequence[Edge], info: ModelInfo) -> tuple[Edge, ...]:
    """The edges on some path of these edges from ``embed`` to the logits."""
    both = set(connected_to_logits(edges, info)) & set(fed_from_embed(edges, info))
    return tuple(e for e in edges if e in both)


@dataclass(frozen=True)
class Circuit:
    """Edges kept (confirmed, |exact effect| >= threshold, on a path from ``embed`` to the logits)."""

    edges: tuple[Edge, ...]
    threshold: float
    effects: tuple[float, ...]  # each edge's exact effect, in the order of ``edges``

    def names(self) -> list[str]:
        return [e.name for e in self.edges]


def build_circuit(confirmation: Confirmation, info: ModelInfo, *, threshold: float | None = None,
                  rel_threshold: float = 0.05) -> Circuit:
    """Confirmed edges whose exact effect reaches ``threshold`` in absolute value (default:
    ``rel_threshold`` of |m(clean) - m(corrupt)|, an edge that alone moves the metric by that
    share of what the whole graph carries), pruned to those connected to the logits and fed
    from ``embed`` (:func:`on_paths`; the edges the second condition drops change nothing in a
    circuit run)."""
    exact = confirmation.exact
    if threshold is None:
        threshold = rel_threshold * abs(float((confirmation.clean - confirmation.corrupt).mean()))
    if threshold < 0:
        raise UserError(f"threshold must be >= 0, got {threshold}")
    above = [e for i, e in enumerate(confirmation.edges) if abs(float(exact[i])) >= threshold]
    kept = on_paths(above, info)
    effect = {e: float(exact[i]) for i, e in enumerate(confirmation.edges)}
    return Circuit(kept, float(threshold), tuple(effect[e] for e in kept))


@dataclass
class Faithfulness:
    circuit: Circuit
    value: float  # (m(C) - m(empty)) / (m(full) - m(empty))
    circuit_metric: float  # m(C), mean over prompts
    full_metric: float  # m(clean)
    empty_metric: float  # m(corrupt)
    random: torch.Tensor  # [draws]: faithfulness of random circuits of the same size
    percentile: float  # share of random circuits below the circuit (ties count half), in %
    per_prompt: torch.Tensor  # [prompts]: m(C) of each prompt pair
    interval: Interval  # ``value`` with its bootstrap interval over prompt pairs
    stats: dict[str, Any] = field(default_factory=dict)


def _masks(circuits: Sequence[Sequence[Edge]], receivers: Sequence[Receiver]) -> dict[Receiver, dict[Sender, torch.Tensor]]:
    """Per receiver and sender: which circuits keep the edge (a [circuits] 0/1 mask)."""
    out: dict[Receiver, dict[Sender, torch.Tensor]] = {r: {} for r in receivers}
    for c, edges in enumerate(circuits):
        for e in edges:
            if e.receiver not in out:
                raise UserError(f"circuit edge {e.name} has a receiver outside the graph")
            m = out[e.receiver].setdefault(e.sender, torch.zeros(len(circuits)))
            m[c] = 1.0
    return out


class _CircuitInputs:
    """The input each receiver reads in a circuit run (see the module docstring)."""

    def __init__(self, model: LoadedModel, runs: PairRuns, masks: dict[Receiver, dict[Sender, torch.Tensor]],
                 live: LiveActs) -> None:
        self.runs, self.masks, self.live = runs, masks, live
        self.maps = SenderMaps(model)
        self.n_layers = model.info.n_layers
        self.n_heads = model.info.n_heads
        self.dev, self.dtype = model.device, model.dtype

    def rows(self, mask: torch.Tensor) -> torch.Tensor:
        """A per-circuit mask as a per-row one, [rows, 1, 1]."""
        return mask.to(self.dev, self.dtype).repeat_interleave(self.runs.n_prompts)[:, None, None]

    def tile(self, t: torch.Tensor, n_circuits: int) -> torch.Tensor:
        return t.repeat(n_circuits, *([1] * (t.dim() - 1)))

    def __call__(self, r: Receiver, c: int, x: torch.Tensor) -> torch.Tensor:
        n_circ = x.shape[0] // self.runs.n_prompts
        out = self.tile(read_input(r, self.runs.corrupt, self.n_layers), n_circ)
        heads: dict[int, torch.Tensor] = {}
        for s, mask in self.masks[r].items():
            if s.kind == "embed":
                out = out + self.rows(mask) * self.tile(self.runs.clean["resid_pre.0"] - self.runs.corrupt["resid_pre.0"], n_circ)
            elif s.kind == "mlp":
                site = f"mlp_out.{s.layer}"
                out = out + self.rows(mask) * (self.live.acts[site] - self.tile(self.runs.corrupt[site], n_circ))
            else:
                layer = int(s.layer or 0)
                hm = heads.setdefault(layer, torch.zeros(n_circ, self.n_heads))
                hm[:, int(s.head or 0)] = mask
        for layer, hm in heads.items():
            out = out + self._heads(layer, hm, n_circ)
        return out

    def _heads(self, layer: int, hm: torch.Tensor, n_circ: int) -> torch.Tensor:
        """P(S' + sum of kept heads' (live - corrupt) outputs) - P(S'), per row."""
        z_bad = self.tile(self.runs.corrupt[f"z.{layer}"], n_circ)
        keep = hm.to(self.dev, self.dtype).repeat_interleave(self.runs.n_prompts, dim=0)[:, None, :, None]
        dz = (self.live.acts[f"z.{layer}"] - z_bad) * keep
        change = self.maps.head_outputs(dz, layer).sum(-2)
        if not self.maps.post_norm:
            return change
        return self.maps.through_post_norm(self.maps.attn_pre_norm(z_bad, layer), change, layer)


def circuit_values(model: LoadedModel, runs: PairRuns, circuits: Sequence[Sequence[Edge]], graph: Graph | None = None,
                   *, budget_bytes: int | None = None, progress: bool = False) -> torch.Tensor:
    """The metric [circuits, prompts] of each circuit's run, circuits as blocks of rows."""
    info = model.info
    graph = full_graph(info) if graph is None else graph
    if graph.ungrouped:
        raise UserError("circuit runs take grouped k/v receivers only")
    receivers = graph.receivers
    n, p = runs.n_prompts, runs.seq_len
    n_logit = p if runs.metric.positions is None else len(runs.metric.positions)
    per_circuit = n * (bytes_per_row(model, p, n_logit) + activation_bytes(model, p, resid=6))
    budget = default_budget(model) if budget_bytes is None else int(budget_bytes)
    cap = units_within(budget, per_circuit)
    passes, maps = PairPasses(model, runs), ReceiverMaps(model)
    out = torch.empty(len(circuits), n, dtype=torch.float64)
    starts = range(0, len(circuits), cap)
    for i in tqdm(starts, desc="circuit runs", disable=not progress, leave=False):
        chunk = list(circuits[i : i + cap])
        masks = _masks(chunk, receivers)
        live = LiveActs()
        ivs, _ = receiver_edits(maps, receivers, _CircuitInputs(model, runs, masks, live), live)
        ivs += _sender_taps(masks, live)
        with torch.no_grad():
            logits, _ = passes.forward(runs.clean["resid_pre.0"].repeat(len(chunk), 1, 1), 0, ivs)
        out[i : i + len(chunk)] = passes.metric(logits, len(chunk))
    return out


def _sender_taps(masks: dict[Receiver, dict[Sender, torch.Tensor]], live: LiveActs) -> list[Intervention]:
    """Taps of the live outputs of the senders some circuit keeps (after any write there)."""
    sites: set[str] = set()
    for per in masks.values():
        for s in per:
            if s.kind == "head":
                sites.add(f"z.{s.layer}")
            elif s.kind == "mlp":
                sites.add(f"mlp_out.{s.layer}")
    return [Tap(site_name=s, live=live) for s in sorted(sites)]


def random_circuits(graph: Graph, info: ModelInfo, size: int, draws: int, seed: int = 0,
                    baseline: Baseline = "connected") -> list[tuple[Edge, ...]]:
    """``draws`` random circuits of ``size`` edges of the graph (seeded).

    ``uniform``: edges drawn uniformly without replacement; most such sets have no path to the
    logits and score the corrupt run's metric. ``connected`` (default): grown from the logits,
    each next edge drawn uniformly among those feeding a component already in the circuit (or
    the logits), so every random circuit is, like the pruned circuit, connected to the logits.
    """
    edges = graph.edges
    if size > len(edges):
        raise UserError(f"a circuit of {size} edges is larger than the graph ({len(edges)} edges)")
    if baseline not in BASELINES:
        raise UserError(f"unknown baseline {baseline!r} (known: {', '.join(BASELINES)})")
    gen = torch.Generator().manual_seed(seed)
    if baseline == "uniform":
        return [tuple(edges[j] for j in sorted(torch.randperm(len(edges), generator=gen)[:size].tolist()))
                for _ in range(draws)]
    feeding: dict[Node, list[int]] = defaultdict(list)
    for i, e in enumerate(edges):
        for node in receiver_nodes(e.receiver, info):
            feeding[node].append(i)
    return [_grown(edges, feeding, size, gen) for _ in range(draws)]


def _grown(edges: Sequence[Edge], feeding: dict[Node, list[int]], size: int, gen: torch.Generator) -> tuple[Edge, ...]:
    alive: set[Node] = {("logits", -1, -1)}
    pool = list(feeding[("logits", -1, -1)])
    chosen: set[int] = set()
    while len(chosen) < size and pool:
        i = pool.pop(int(torch.randint(len(pool), (1,), generator=gen)))
        if i in chosen:
            continue
        chosen.add(i)
        node = sender_node(edges[i].sender)
        if node not in alive:
            alive.add(node)
            pool.extend(feeding.get(node, []))
    return tuple(edges[i] for i in sorted(chosen))


def faithfulness(model: LoadedModel, runs: PairRuns, circuit: Circuit, graph: Graph | None = None, *,
                 draws: int = 20, seed: int = 0, baseline: Baseline = "connected", budget_bytes: int | None = None,
                 progress: bool = False) -> Faithfulness:
    """The circuit's faithfulness against ``draws`` random circuits of its size, with its
    bootstrap interval over prompt pairs (resamples seeded with ``seed``; see the module docstring)."""
    t0 = time.perf_counter()
    if draws < 1:
        raise UserError(f"draws must be at least 1, got {draws}")
    graph = full_graph(model.info) if graph is None else graph
    full, empty = float(runs.clean_metric.mean()), float(runs.corrupt_metric.mean())
    if abs(full - empty) < 1e-9 * max(1.0, abs(full)):
        raise UserError("the clean and corrupt prompts give the same metric: faithfulness is undefined")
    rand = random_circuits(graph, model.info, len(circuit.edges), draws, seed, baseline)
    per_prompt = circuit_values(model, runs, [circuit.edges, *rand], graph, budget_bytes=budget_bytes,
                                progress=progress)
    values = per_prompt.mean(dim=1)
    faith = (values - empty) / (full - empty)
    below = float((faith[1:] < faith[0]).sum() + 0.5 * (faith[1:] == faith[0]).sum())
    stats = {"draws": draws, "seed": seed, "baseline": baseline, "size": len(circuit.edges), "graph_edges": len(graph.edges),
             "seconds": time.perf_counter() - t0}
    iv = faithfulness_interval(per_prompt[0], runs.clean_metric, runs.corrupt_metric, seed=seed)
    return Faithfulness(circuit, float(faith[0]), float(values[0]), full, empty, faith[1:], 100 * below / draws,
                        per_prompt[0], iv, stats)


__all__ = ["BASELINES", "Baseline", "Circuit", "Faithfulness", "build_circuit", "circuit_values", "connected_to_logits",
           "faithfulness", "fed_from_embed", "on_paths", "random_circuits", "receiver_nodes", "sender_node"]
