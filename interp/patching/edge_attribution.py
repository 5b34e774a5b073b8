"""Edge attribution (EAP, EAP-IG) for every edge of a graph at once, then exact confirmation.

EAP (Syed et al. 2023) scores an edge by the first-order change of the metric when it carries
the corrupt run's value: (sender_corrupt - sender_clean) . d metric / d receiver_input, the
gradient taken at the clean run, per prompt and summed over positions. The gradient is with
respect to the receiver's *own* input: each receiver of the graph is recomputed from a private
copy of the residual where it reads (:mod:`interp.patching.taps`), so one backward pass gives
every receiver's gradient, norm included. A sender's change is the exact one of
:mod:`interp.patching.senders` (through Gemma's post-attention norm).

EAP-IG (Hanna et al. 2024, "Have Faith in Faithfulness", sec. 3) averages that gradient over
``steps`` inputs on the straight line between the clean and the corrupt residual entering layer
0: clean + (k / steps) (corrupt - clean), k = 1..steps (the points of their code, which start
at the corrupt end), one backward per chunk of points. ``method="eap"`` is the single point
k = 0 (the clean run).

Both are linearisations. :func:`confirm_edges` re-runs the top edges by |score| with exact path
patching (:mod:`interp.patching.paths`) and reports the Spearman rank correlation of the two on
the confirmed set. Ungrouped receivers (``kq``, ``vq``) are scored by exact path patching only.
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
from interp.model.loaded import LoadedModel
from interp.patching.attribution import spearman
from interp.patching.edges import Edge, Graph, Receiver, Sender, full_graph, precedes
from interp.patching.memory import activation_bytes, default_budget, units_within
from interp.patching.pairs import PairRuns
from interp.patching.paths import Mode, PairPasses, path_patch, receiver_edits
from interp.patching.receivers import ReceiverMaps
from interp.patching.senders import SenderMaps, block_changes
from interp.patching.taps import LiveActs

Method = Literal["eap", "eap-ig"]
METHODS: tuple[str, ...] = ("eap", "eap-ig")


@dataclass
class EdgeScores:
    """Attribution scores of a graph's edges, per prompt and averaged over prompts."""

    edges: tuple[Edge, ...]
    values: torch.Tensor  # [edges, prompts] float64
    method: Method
    steps: int
    metric: str
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        return f"{self.method}.steps-{self.steps}" if self.method == "eap-ig" else "eap"

    @property
    def scores(self) -> torch.Tensor:
        return self.values.mean(dim=1)

    def top(self, n: int) -> list[int]:
        """Indices of the ``n`` largest |score|, largest first."""
        k = min(n, len(self.edges))
        return self.scores.abs().topk(k).indices.tolist()

    def to_frame(self) -> Any:
        import pandas as pd

        s = self.scores
        return pd.DataFrame([{"sender": e.sender.name, "receiver": e.receiver.name, "score": float(s[i]),
                              "method": self.variant} for i, e in enumerate(self.edges)])


def _alphas(method: Method, steps: int) -> list[float]:
    if method not in METHODS:
        raise UserError(f"unknown edge attribution method {method!r} (known: {', '.join(METHODS)})")
    if method == "eap":
        return [0.0]
    if steps < 1:
        raise UserError(f"EAP-IG needs at least 1 step, got {steps}")
    return [k / steps for k in range(1, steps + 1)]


def _grad_row_bytes(model: LoadedModel, runs: PairRuns, n_receivers: int) -> int:
    """Bytes one row keeps for its backward pass: every layer's activations, each receiver's
    own input and norm, and the logits."""
    p, n_layers = runs.seq_len, model.info.n_layers
    n_logit = p if runs.metric.positions is None else len(runs.metric.positions)
    return activation_bytes(model, p, resid=12 * n_layers + 4 * n_receivers, mlp=4 * n_layers,
                            scores=3 * n_layers, logits=3, logit_positions=n_logit)


def receiver_gradients(model: LoadedModel, runs: PairRuns, receivers: Sequence[Receiver], alphas: Sequence[float],
                       *, budget_bytes: int | None = None, progress: bool = False) -> dict[Receiver, torch.Tensor]:
    """d metric / d (each receiver's own input), [prompts, p, d] each, averaged over the inputs
    clean + alpha (corrupt - clean) entering layer 0."""
    n = runs.n_prompts
    passes = PairPasses(model, runs)
    maps = ReceiverMaps(model)
    budget = default_budget(model) if budget_bytes is None else int(budget_bytes)
    per_alpha = n * _grad_row_bytes(model, runs, len(receivers))
    cap = units_within(budget, per_alpha)
    start, end = runs.clean["resid_pre.0"], runs.corrupt["resid_pre.0"]
    total: dict[Receiver, torch.Tensor] = {r: torch.zeros_like(start) for r in receivers}
    chunks = [list(alphas[i : i + cap]) for i in range(0, len(alphas), cap)]
    for chunk in tqdm(chunks, desc="edge attribution", disable=not progress, leave=False):
        entry = torch.cat([start + a * (end - start) for a in chunk]).detach().requires_grad_(True)
        own: dict[Receiver, torch.Tensor] = {}

        def own_input(r: Receiver, c: int, x: torch.Tensor, own: dict[Receiver, torch.Tensor] = own) -> torch.Tensor:
            own[r] = x.clone()
            return own[r]

        ivs, _ = receiver_edits(maps, receivers, own_input, LiveActs())
        with torch.enable_grad():
            logits, _ = passes.forward(entry, 0, ivs, grad=True)
            idx = torch.arange(n, device=logits.device).repeat(len(chunk))
            value = passes.runner.metric(logits, idx).sum()
            grads = torch.autograd.grad(value, [own[r] for r in receivers], allow_unused=True)
        for r, g in zip(receivers, grads, strict=True):
            if g is not None:
                total[r] += g.detach().view(len(chunk), *start.shape).sum(0)
    return {r: t / len(alphas) for r, t in total.items()}


def edge_attribution(
    model: LoadedModel,
    runs: PairRuns,
    graph: Graph | None = None,
    *,
    method: Method = "eap-ig",
    steps: int = 5,
    budget_bytes: int | None = None,
    progress: bool = False,
) -> EdgeScores:
    """EAP or EAP-IG scores of every edge of ``graph`` (default: the model's full graph)."""
    t0 = time.perf_counter()
    alphas = _alphas(method, steps)
    info = model.info
    graph = full_graph(info) if graph is None else graph
    graph.check(info)
    if graph.ungrouped:
        raise UserError("edge attribution scores grouped k/v receivers only; score ungrouped (kq/vq) edges "
                        "with exact path patching")
    edges = graph.edges
    if not edges:
        raise UserError("the graph has no edges (every receiver is at or below every sender)")
    receivers = tuple(sorted({e.receiver for e in edges}, key=Receiver.sort_key))
    grads = receiver_gradients(model, runs, receivers, alphas, budget_bytes=budget_bytes, progress=progress)
    values = _scores(model, runs, edges, grads)
    stats = {"n_edges": len(edges), "n_receivers": len(receivers), "alphas": alphas,
             "seconds": time.perf_counter() - t0}
    return EdgeScores(edges, values, method, len(alphas) if method == "eap-ig" else 0, runs.metric.name, stats)


def _scores(model: LoadedModel, runs: PairRuns, edges: Sequence[Edge],
            grads: dict[Receiver, torch.Tensor]) -> torch.Tensor:
    """Per edge and prompt: the sender's change . the receiver's gradient, summed over
    positions and d_model; senders' changes computed a layer at a time."""
    maps = SenderMaps(model)
    by_layer: dict[tuple[float, float], list[Sender]] = defaultdict(list)
    for s in sorted({e.sender for e in edges}, key=Sender.sort_key):
        by_layer[s.writes_at].append(s)
    index = {(e.sender, e.receiver): i for i, e in enumerate(edges)}
    out = torch.zeros(len(edges), runs.n_prompts, dtype=torch.float64)
    with torch.no_grad():
        for senders in by_layer.values():
            change = block_changes(maps, runs.clean, runs.corrupt, [(s,) for s in senders])  # [S, n, p, d]
            for r, g in grads.items():
                if not precedes(senders[0], r):
                    continue
                dots = torch.einsum("snpd,npd->sn", change, g.to(change.dtype)).double().cpu()
                for j, s in enumerate(senders):
                    i = index.get((s, r))
                    if i is not None:
                        out[i] = dots[j]
    return out


@dataclass
class Confirmation:
    """The top edges by |attribution|, re-run with exact path patching."""

    scores: EdgeScores
    edges: tuple[Edge, ...]
    estimate: torch.Tensor  # [confirmed] mean attribution score
    exact_values: torch.Tensor  # [confirmed, prompts] metric with the edge patched
    clean: torch.Tensor  # [prompts]: the clean run's metric
    corrupt: torch.Tensor  # [prompts]: the corrupt run's metric
    mode: Mode
    spearman: float

    @property
    def exact(self) -> torch.Tensor:
        """Per confirmed edge: mean over prompts of (patched - clean)."""
        return (self.exact_values - self.clean[None]).mean(dim=1)

    def to_frame(self) -> Any:
        import pandas as pd

        ex = self.exact
        return pd.DataFrame([{"sender": e.sender.name, "receiver": e.receiver.name, "score": float(self.estimate[i]),
                              "exact": float(ex[i]), "mode": self.mode} for i, e in enumerate(self.edges)])


def exact_edge_values(model: LoadedModel, runs: PairRuns, edges: Sequence[Edge], *, mode: Mode = "direct",
                      budget_bytes: int | None = None, progress: bool = False) -> torch.Tensor:
    """The metric [edges, prompts] with each edge alone patched exactly: one path-patching call
    per receiver, its senders as the rows of that call."""
    by_receiver: dict[Receiver, list[int]] = defaultdict(list)
    for i, e in enumerate(edges):
        by_receiver[e.receiver].append(i)
    out = torch.empty(len(edges), runs.n_prompts, dtype=torch.float64)
    for r, idx in tqdm(list(by_receiver.items()), desc="exact edges", disable=not progress, leave=False):
        res = path_patch(model, runs, [edges[i].sender for i in idx], [r], mode=mode, budget_bytes=budget_bytes)
        out[idx] = res.values
    return out


def confirm_edges(model: LoadedModel, runs: PairRuns, scores: EdgeScores, *, top_n: int = 200,
                  mode: Mode = "direct", budget_bytes: int | None = None, progress: bool = False) -> Confirmation:
    """Exact path patching of the ``top_n`` edges by |score|; Spearman of score vs exact effect."""
    if top_n < 1:
        raise UserError(f"top_n must be at least 1, got {top_n}")
    idx = scores.top(top_n)
    edges = tuple(scores.edges[i] for i in idx)
    values = exact_edge_values(model, runs, edges, mode=mode, budget_bytes=budget_bytes, progress=progress)
    estimate = scores.scores[idx]
    exact = (values - runs.clean_metric[None]).mean(dim=1)
    return Confirmation(scores, edges, estimate, values, runs.clean_metric, runs.corrupt_metric, mode,
                        spearman(estimate, exact))


__all__ = ["METHODS", "Confirmation", "EdgeScores", "Method", "confirm_edges", "edge_attribution",
           "exact_edge_values", "receiver_gradients"]
