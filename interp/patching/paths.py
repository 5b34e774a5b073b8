"""Exact path patching between components, batched: all senders into one receiver set per call.

Two modes, both exact (every norm recomputed, none linearised):

- ``direct``: each receiver of the set reads its live input plus the sender's corrupt-minus-clean
  output (:mod:`interp.patching.senders`; through Gemma's post-attention norm exactly), its own
  input norm recomputed on that sum; every other component, downstream included, runs normally
  on the clean prompt. Head -> logits is the direct path of a head to the logits.
- ``frozen`` (Wang et al. 2022, appendix B): a first pass on the clean prompt with every head
  but the sender frozen to its clean output (z), the sender patched to its corrupt output, MLPs
  and norms recomputed, caches each receiver's input; a second pass on the clean prompt
  recomputes only the receivers from those inputs.

Batching: a call takes one receiver set and any number of sender *blocks* (a sender, or
several patched together); each block is a block of rows (one per prompt) of the batch. The
direct pass, and the frozen mode's second pass, enter at the lowest receiver's layer from the
clean run's cached residual (the engine's layer reuse, ``run_from_layer``); the frozen mode's
first pass enters at the block's lowest sender layer. Blocks are chunked to the memory budget
(:mod:`interp.patching.memory`). A call is the unit a detector can send to a Dask worker: calls
for different receiver sets are independent and their results are concatenated.

Every sender must precede every receiver of the set (a UserError otherwise): a sender at or
after its receiver's layer has no path to it, and its effect would be zero. Ungrouped receivers
(``kq``, ``vq``) cost one extra copy of the rows per ungrouped query head
(:mod:`interp.patching.taps`).
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
from interp.model.interventions import Intervention, Patch
from interp.model.loaded import LoadedModel
from interp.patching.edges import (
    Edge,
    Receiver,
    Sender,
    check_pairs,
    parse_receivers,
    parse_sender,
)
from interp.patching.forwards import SweepForwards
from interp.patching.intervals import LEVEL, effect_interval
from interp.patching.memory import activation_bytes, bytes_per_row, default_budget, units_within
from interp.patching.pairs import PairRuns
from interp.patching.planning import plan_chunks
from interp.patching.receivers import ReceiverMaps, input_key, input_sites, read_input, write_site
from interp.patching.senders import SenderMaps, block_changes
from interp.patching.taps import CopyHeads, InputFn, LiveActs, Tap, WriteReceivers
from interp.stats import Interval

Mode = Literal["direct", "frozen"]
MODES: tuple[str, ...] = ("direct", "frozen")
Block = tuple[Sender, ...]
SendersArg = Sequence[Sender | str | Sequence[Sender | str]]


def normalise_blocks(senders: SendersArg) -> tuple[Block, ...]:
    """Each element a block: a sender (name or value) alone, or a sequence patched together."""
    blocks: list[Block] = []
    for item in senders:
        if isinstance(item, Sender | str):
            blocks.append((parse_sender(item),))
        else:
            block = tuple(parse_sender(s) for s in item)
            if not block:
                raise UserError("an empty sender block")
            if len({s.name for s in block}) != len(block):
                raise UserError(f"sender block {[s.name for s in block]} names a sender twice")
            blocks.append(block)
    if not blocks:
        raise UserError("no senders given")
    return tuple(blocks)


def block_name(block: Block) -> str:
    return "+".join(s.name for s in block)


@dataclass
class PathResult:
    """Metric per sender block and prompt with the set's receivers edited, and the two runs'."""

    receivers: tuple[Receiver, ...]
    blocks: tuple[Block, ...]
    mode: Mode
    metric: str
    values: torch.Tensor  # [blocks, prompts] float64
    clean: torch.Tensor  # [prompts]: the clean run's metric
    corrupt: torch.Tensor  # [prompts]: the corrupt run's metric
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        ungrouped = ".ungrouped" if any(r.ungrouped for r in self.receivers) else ""
        return f"path-patching.{self.mode}{ungrouped}"

    def effect(self) -> torch.Tensor:
        """Per block: mean over prompts of (patched - clean)."""
        return (self.values - self.clean[None]).mean(dim=1)

    def effect_intervals(self, level: float = LEVEL) -> list[Interval]:
        """Per block: the effect with its paired t interval over prompts (the effect is a plain
        mean of per-prompt differences; :mod:`interp.patching.intervals`)."""
        return [effect_interval(self.values[i], self.clean, level) for i in range(len(self.blocks))]

    def edge_effects(self) -> list[tuple[Edge, float]]:
        """(edge, effect) for a single receiver and single-sender blocks."""
        eff = self.effect()
        return [(e, float(eff[i])) for i, e in enumerate(self.edges())]

    def edges(self) -> list[Edge]:
        """Each block as an edge, for a single receiver and single-sender blocks."""
        if len(self.receivers) != 1 or any(len(b) != 1 for b in self.blocks):
            raise UserError("edge effects need one receiver and one sender per block")
        return [Edge(b[0], self.receivers[0]) for b in self.blocks]

    def to_frame(self) -> Any:
        import pandas as pd

        eff = self.effect()
        recv = ",".join(r.name for r in self.receivers)
        return pd.DataFrame([{"sender": block_name(b), "receivers": recv, "effect": float(eff[i]),
                              "mode": self.mode, "metric": self.metric} for i, b in enumerate(self.blocks)])


@dataclass(frozen=True)
class _Helper:
    """The rows of an ungrouped query head: its group's key/value edited for every head there."""

    layer: int
    head: int
    receivers: tuple[Receiver, ...]


def helpers_of(receivers: Sequence[Receiver]) -> tuple[_Helper, ...]:
    by_head: dict[tuple[int, int], list[Receiver]] = defaultdict(list)
    for r in receivers:
        if r.ungrouped:
            by_head[(int(r.layer or 0), int(r.head or 0))].append(r)
    return tuple(_Helper(layer, head, tuple(rs)) for (layer, head), rs in sorted(by_head.items()))


def receiver_edits(maps: ReceiverMaps, receivers: Sequence[Receiver], input_fn: InputFn,
                   live: LiveActs) -> tuple[list[Intervention], int]:
    """The pass's taps, receiver writes and (for ungrouped receivers) head copies; the number
    of row copies the pass needs."""
    n_layers = maps.info.n_layers
    helpers = helpers_of(receivers)
    n_copies = 1 + len(helpers)
    taps = sorted({s for r in receivers if r.kind != "logits" for s in input_sites(r, n_layers)})
    ivs: list[Intervention] = [Tap(site_name=s, live=live) for s in taps]
    grouped: dict[str, list[Receiver]] = defaultdict(list)
    for r in receivers:
        if not r.ungrouped:
            grouped[write_site(r, n_layers)].append(r)
    every = tuple(range(n_copies))
    for site, rs in grouped.items():
        ivs.append(WriteReceivers(site_name=site, receivers=tuple(rs), copies=every, n_copies=n_copies,
                                  maps=maps, live=live, input_fn=input_fn))
    for c, h in enumerate(helpers, start=1):
        for r in h.receivers:
            ivs.append(WriteReceivers(site_name=write_site(r, n_layers), receivers=(r,), copies=(c,),
                                      n_copies=n_copies, maps=maps, live=live, input_fn=input_fn))
        ivs.append(CopyHeads(site_name=f"z.{h.layer}", heads=(h.head,), source=c, n_copies=n_copies))
    return ivs, n_copies


class PairPasses:
    """Forward passes over rows that repeat the clean prompts, entering at a layer with a given
    residual (``run_from_layer`` where the backend has it, else a full pass that patches that
    residual in), each computing only the logits the metric reads."""

    def __init__(self, model: LoadedModel, runs: PairRuns) -> None:
        self.model, self.runs = model, runs
        self.runner = SweepForwards(model, runs.metric, runs.seq_len)
        self.from_layer = model.backend.capabilities.run_from_layer

    def forward(self, entry: torch.Tensor, layer: int, ivs: Sequence[Intervention],
                sources: dict[str, dict[str, torch.Tensor]] | None = None, *, grad: bool = False,
                cache: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits at the metric's positions and the cached sites of rows entering ``layer``
        with residual ``entry`` [rows, p, d] (rows a multiple of the prompts)."""
        copies = entry.shape[0] // self.runs.n_prompts
        tokens = self.runs.clean_tokens.repeat(copies, 1)
        sources = dict(sources or {})
        if self.from_layer:
            logits, out, _ = self.runner.forward(tokens, ivs, sources, start=layer, resid=entry, grad=grad,
                                                 cache=cache)
            return logits, out
        sources["entry"] = {f"resid_pre.{layer}": entry}
        patch = Patch(site_name=f"resid_pre.{layer}", source="entry")
        logits, out, _ = self.runner.forward(tokens, [patch, *ivs], sources, grad=grad, cache=cache)
        return logits, out

    def metric(self, logits: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The metric of the first ``n_blocks`` blocks of rows, [n_blocks, prompts] float64 CPU."""
        n = self.runs.n_prompts
        idx = torch.arange(n, device=logits.device).repeat(n_blocks)
        return self.runner.metric(logits[: n_blocks * n], idx).view(n_blocks, n).double().cpu()


@dataclass
class _Call:
    model: LoadedModel
    runs: PairRuns
    receivers: tuple[Receiver, ...]
    maps: ReceiverMaps
    senders: SenderMaps
    passes: PairPasses

    @property
    def entry_layer(self) -> int:
        return min(r.layer_in(self.model.info) for r in self.receivers)

    def clean_entry(self, layer: int, n_blocks: int) -> torch.Tensor:
        return self.runs.clean[f"resid_pre.{layer}"].repeat(n_blocks, 1, 1)


def _direct_chunk(call: _Call, blocks: Sequence[Block]) -> torch.Tensor:
    """Values [blocks, prompts]: each receiver reads its live input + the block's change."""
    runs = call.runs
    change = block_changes(call.senders, runs.clean, runs.corrupt, blocks).flatten(0, 1)
    live = LiveActs()
    ivs, copies = receiver_edits(call.maps, call.receivers, lambda r, c, x: x + change, live)
    layer = call.entry_layer
    logits, _ = call.passes.forward(call.clean_entry(layer, copies * len(blocks)), layer, ivs)
    return call.passes.metric(logits, len(blocks))


def _start(block: Block) -> int:
    """The lowest layer a block's senders write in (``embed``: 0)."""
    return min(0 if s.layer is None else s.layer for s in block)


def _frozen_first(call: _Call, blocks: Sequence[Block], layer: int) -> dict[str, torch.Tensor]:
    """Wang et al.'s first pass: each receiver's input with every head but the block's frozen
    to the clean run, the block at the corrupt run's output, MLPs and norms recomputed."""
    runs, info = call.runs, call.model.info
    n = runs.n_prompts
    prompt_of = tuple(range(n)) * len(blocks)
    entry = call.clean_entry(layer, len(blocks)).clone()
    ivs: list[Intervention] = [Patch(site_name=f"z.{lay}", source="clean", source_batch=prompt_of)
                               for lay in range(layer, info.n_layers)]
    for b, block in enumerate(blocks):
        block_rows = tuple(range(b * n, (b + 1) * n))
        for s in block:
            if s.kind == "embed":
                entry[b * n : (b + 1) * n] = runs.corrupt["resid_pre.0"]
            elif s.kind == "head":
                ivs.append(Patch(site_name=f"z.{s.layer}", source="corrupt", heads=(int(s.head or 0),),
                                 batch=block_rows, source_batch=tuple(range(n))))
            else:
                ivs.append(Patch(site_name=f"mlp_out.{s.layer}", source="corrupt", batch=block_rows,
                                 source_batch=tuple(range(n))))
    sites = sorted({s for r in call.receivers for s in input_sites(r, info.n_layers)})
    sources = {"clean": runs.clean, "corrupt": runs.corrupt}
    _, cache = call.passes.forward(entry, layer, ivs, sources, cache=sites)
    return {input_key(r, info.n_layers): read_input(r, cache, info.n_layers) for r in call.receivers}


def _frozen_chunk(call: _Call, blocks: Sequence[Block], first_layer: int) -> torch.Tensor:
    inputs = _frozen_first(call, blocks, first_layer)
    n_layers = call.model.info.n_layers
    live = LiveActs()
    ivs, copies = receiver_edits(call.maps, call.receivers, lambda r, c, x: inputs[input_key(r, n_layers)], live)
    layer = call.entry_layer
    logits, _ = call.passes.forward(call.clean_entry(layer, copies * len(blocks)), layer, ivs)
    return call.passes.metric(logits, len(blocks))


def _block_bytes(model: LoadedModel, runs: PairRuns, n_receivers: int, copies: int) -> int:
    """Estimated bytes of one block's rows in one pass: the engine's per-row estimate, plus the
    block's change, the receivers' inputs and their recomputed norms."""
    p = runs.seq_len
    n_logit = p if runs.metric.positions is None else len(runs.metric.positions)
    row = bytes_per_row(model, p, n_logit) + activation_bytes(model, p, resid=3 + 2 * n_receivers)
    return runs.n_prompts * copies * row


def _chunks(call: _Call, blocks: Sequence[Block], mode: Mode, cap: int) -> list[tuple[int, list[int]]]:
    if mode == "direct":
        return [(call.entry_layer, list(range(i, min(i + cap, len(blocks))))) for i in range(0, len(blocks), cap)]
    starts = [_start(b) for b in blocks]
    return plan_chunks(starts, cap, call.runs.n_prompts, call.runs.seq_len, call.model.info.n_layers, True)


def path_patch(
    model: LoadedModel,
    runs: PairRuns,
    senders: SendersArg,
    receivers: Sequence[Receiver | str],
    *,
    mode: Mode = "direct",
    budget_bytes: int | None = None,
    max_blocks: int | None = None,
    progress: bool = False,
) -> PathResult:
    """Patch each sender block into the receiver set (see the module docstring for the modes).

    ``senders``: names or :class:`Sender` values, each alone a block, or sequences of them
    patched together. ``receivers``: one receiver set. ``budget_bytes``: memory for one chunk
    (default a quarter of the free memory); ``max_blocks`` caps blocks per chunk.
    """
    t0 = time.perf_counter()
    if mode not in MODES:
        raise UserError(f"unknown path-patching mode {mode!r} (known: {', '.join(MODES)})")
    blocks = normalise_blocks(senders)
    recv = parse_receivers(receivers)
    info = model.info
    for b in blocks:
        for s in b:
            s.check(info)
        check_pairs(b, recv)
    for r in recv:
        r.check(info)
    maps = ReceiverMaps(model)
    call = _Call(model, runs, recv, maps, SenderMaps(model), PairPasses(model, runs))
    copies = 1 + len(helpers_of(recv))
    per_block = _block_bytes(model, runs, len(recv), copies)
    budget = default_budget(model) if budget_bytes is None else int(budget_bytes)
    cap = min(units_within(budget, per_block), max_blocks or len(blocks))
    values = torch.empty(len(blocks), runs.n_prompts, dtype=torch.float64)
    chunks = _chunks(call, blocks, mode, cap)
    with torch.no_grad():
        for start, idx in tqdm(chunks, desc=f"path patching ({mode})", disable=not progress, leave=False):
            chunk = [blocks[i] for i in idx]
            vals = _direct_chunk(call, chunk) if mode == "direct" else _frozen_chunk(call, chunk, start)
            values[idx] = vals
    stats = {"n_blocks": len(blocks), "chunks": len(chunks), "blocks_per_chunk": [len(i) for _, i in chunks],
             "copies": copies, "entry_layer": call.entry_layer, "forwards": call.passes.runner.forwards,
             "token_layers": call.passes.runner.token_layers, "budget_bytes": budget, "bytes_per_block": per_block,
             "receiver_map_error": runs.map_error, "seconds": time.perf_counter() - t0}
    return PathResult(recv, blocks, mode, runs.metric.name, values, runs.clean_metric, runs.corrupt_metric, stats)


__all__ = ["MODES", "Block", "Mode", "PairPasses", "PathResult", "block_name", "helpers_of", "normalise_blocks",
           "path_patch", "receiver_edits"]
