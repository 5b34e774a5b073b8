"""Planning a sweep before any forward pass: cases grouped into chunks by their start layer and
position, sized to the memory budget, with the reuse decisions (:class:`SweepPlan`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from interp.errors import UserError
from interp.model.interventions import Intervention
from interp.model.loaded import LoadedModel
from interp.patching.memory import bytes_per_row, default_budget
from interp.patching.metrics import Metric, _check_metric, _logit_positions
from interp.patching.sources import _check_tokens, _reference, _same_prefix
from interp.patching.sweeps import Case, Sweep

# A forward pass costs Python overhead on top of its arithmetic; the planner counts it as this
# many token-layers per layer run, so it merges tiny chunks but never big ones.
_OVERHEAD_TOKENS_PER_LAYER = 32


def plan_chunks(starts: Sequence[int], max_cases: int, rows_per_case: int, seq_len: int,
                n_layers: int, prefix_reuse: bool) -> list[tuple[int, list[int]]]:
    """Group case indices into (start layer, indices) chunks of at most ``max_cases``.

    Minimises the estimated cost: token-layers computed (rows x tokens x layers from the
    chunk's lowest start) plus a per-forward overhead, over contiguous runs of cases
    sorted by start layer (a small dynamic programme).
    """
    order = sorted(range(len(starts)), key=lambda i: (starts[i] if prefix_reuse else 0, i))
    eff = [starts[i] if prefix_reuse else 0 for i in order]
    n = len(order)
    tok = rows_per_case * seq_len
    overhead = _OVERHEAD_TOKENS_PER_LAYER * n_layers
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(max(0, i - max_cases), i):
            cost = best[j] + (i - j) * tok * (n_layers - eff[j]) + overhead
            if cost < best[i]:
                best[i], cut[i] = cost, j
    chunks = []
    i = n
    while i > 0:
        j = cut[i]
        chunks.append((eff[j], order[j:i]))
        i = j
    return chunks[::-1]


@dataclass(frozen=True)
class Chunk:
    """One forward pass: the cases (indices into the plan's) stacked in the batch, each a
    block of one row per prompt, computing positions ``offset``.. and layers ``start``.."""

    offset: int
    start: int
    cases: tuple[int, ...]


@dataclass(frozen=True)
class SweepPlan:
    """How :func:`run_sweep` executes a sweep on given prompts, decided before any forward pass.

    ``starts``/``offsets``: per case, the lowest layer and position its edits can change
    (the pass computes from there when the reuse is on). ``resid_layers``: where the base run
    caches ``resid_pre`` for chunks to enter at; ``from_resid``: chunks enter from the base
    residual even at layer 0 (base edits, or a cut prefix). The base run can still turn reuse
    off (:meth:`without_sequence_reuse`, :meth:`without_reuse`), which re-plans the chunks.
    """

    sweep: Sweep
    cases: tuple[Case, ...]
    base_interventions: tuple[Intervention, ...]
    n_prompts: int
    seq_len: int
    n_layers: int
    logit_positions: tuple[int, ...] | None
    budget_bytes: int
    bytes_per_case: int
    max_per_chunk: int
    prefix_reuse: bool
    sequence_reuse: bool
    from_resid: bool
    starts: tuple[int, ...]
    offsets: tuple[int, ...]
    resid_layers: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def n_logit_positions(self) -> int:
        return self.seq_len if self.logit_positions is None else len(self.logit_positions)

    def __str__(self) -> str:
        s = self.sweep
        onoff = {True: "on", False: "off"}
        lines = [
            f"{len(self.cases)} cases ({s.over}, {s.intervention}) on {self.n_prompts} prompts x "
            f"{self.seq_len} tokens, {self.n_logit_positions} logit positions",
            f"budget {self.budget_bytes} bytes, {self.bytes_per_case} per case, "
            f"at most {self.max_per_chunk} cases per chunk",
            f"prefix reuse {onoff[self.prefix_reuse]}, sequence reuse {onoff[self.sequence_reuse]}, "
            f"from the base residual {onoff[self.from_resid]}, base caches resid_pre at {list(self.resid_layers)}",
            f"{len(self.chunks)} chunks (cases @ layer/position): "
            + ", ".join(f"{len(c.cases)}@L{c.start}/p{c.offset}" for c in self.chunks),
        ]
        return "\n".join(lines)

    def without_sequence_reuse(self) -> SweepPlan:
        """Every pass computes every position (the base run's KV cache cannot be cut)."""
        offsets = (0,) * len(self.cases)
        return dataclasses.replace(self, sequence_reuse=False, offsets=offsets,
                                   chunks=_plan_chunks(self, self.prefix_reuse, offsets))

    def without_reuse(self) -> SweepPlan:
        """Every pass is a full forward pass (re-entry disagreed with a full pass)."""
        offsets = (0,) * len(self.cases)
        return dataclasses.replace(self, prefix_reuse=False, sequence_reuse=False, from_resid=False,
                                   offsets=offsets, chunks=_plan_chunks(self, False, offsets))


def _plan_chunks(plan: SweepPlan, prefix_reuse: bool, offsets: Sequence[int]) -> tuple[Chunk, ...]:
    """Chunks per position offset, each group split by :func:`plan_chunks`."""
    chunks: list[Chunk] = []
    for off in sorted(set(offsets)):
        group = [i for i, o in enumerate(offsets) if o == off]
        planned = plan_chunks([plan.starts[i] for i in group], plan.max_per_chunk, plan.n_prompts,
                              plan.seq_len - off, plan.n_layers, prefix_reuse)
        chunks.extend(Chunk(off, start, tuple(group[k] for k in idx)) for start, idx in planned)
    return tuple(chunks)


def _selected(cases: list[Case], select: Sequence[int] | None) -> list[Case]:
    if select is not None:
        bad = [i for i in select if not 0 <= i < len(cases)]
        if bad:
            raise UserError(f"case index {bad[0]} out of range (0..{len(cases) - 1})")
        cases = [cases[i] for i in select]
    if not cases:
        raise UserError("the sweep has no cases")
    return cases


def _budget(model: LoadedModel, n_prompts: int, seq_len: int, n_logit_positions: int, kv: bool,
            budget_bytes: int | None, max_cases: int | None) -> tuple[int, int, int]:
    """The chunk budget in bytes, the bytes of one case's block of rows, and the most
    cases per chunk."""
    budget = default_budget(model) if budget_bytes is None else int(budget_bytes)
    per_case = n_prompts * bytes_per_row(model, seq_len, n_logit_positions, kv=kv)
    if budget < per_case:
        raise UserError(
            f"memory budget of {budget} bytes is smaller than one patched case "
            f"({per_case} bytes for {n_prompts} prompts x {seq_len} tokens); raise budget_bytes or use fewer prompts"
        )
    cap = budget // per_case
    if max_cases is not None:
        if max_cases < 1:
            raise UserError(f"max_cases must be at least 1, got {max_cases}")
        cap = min(cap, max_cases)
    return budget, per_case, cap


def plan_sweep(
    model: LoadedModel,
    sweep: Sweep,
    metric: Metric,
    tokens: torch.Tensor,
    source: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    *,
    budget_bytes: int | None = None,
    max_cases: int | None = None,
    prefix_reuse: bool = True,
    sequence_reuse: bool = True,
    select: Sequence[int] | None = None,
    base_interventions: Sequence[Intervention] = (),
) -> SweepPlan:
    """The plan :func:`run_sweep` executes (same arguments); no forward pass is run."""
    tokens = _check_tokens(model, tokens)
    n_prompts, seq_len = tokens.shape
    _check_metric(metric, n_prompts)
    cases = _selected(sweep.cases(model, seq_len), select)
    base_ivs = tuple(base_interventions)
    caps = model.backend.capabilities
    # Only edits below every block are inside the cached residual a chunk starts from.
    prefix = prefix_reuse and caps.run_from_layer and not any(iv.site.layer is not None for iv in base_ivs)
    seq = sequence_reuse and prefix and caps.kv_cache
    logit_positions = _logit_positions(metric, seq_len)
    n_logit = seq_len if logit_positions is None else len(logit_positions)
    budget, per_case, cap = _budget(model, n_prompts, seq_len, n_logit, seq, budget_bytes, max_cases)
    ref = _reference(model, sweep, cases, tokens, source)
    same = _same_prefix(tokens, ref if isinstance(ref, torch.Tensor) else None)
    first_read = 0 if logit_positions is None else min(logit_positions)
    offsets = tuple(min(v.start_position(seq_len, same), first_read) if seq else 0 for v in cases)
    if any(iv.site.layer is None for v in cases for iv in v.edits):
        # An edit of the embedding needs its pass to start from the tokens.
        seq, offsets, embed_edits = False, (0,) * len(cases), True
    else:
        embed_edits = False
    starts = tuple(v.start_layer for v in cases)
    # A chunk enters at its start layer from the base residual; with base edits or a cut
    # prefix it does so even at layer 0, where the residual holds the edited embedding.
    from_resid = prefix and not embed_edits and (bool(base_ivs) or any(o > 0 for o in offsets))
    plan = SweepPlan(
        sweep=sweep, cases=tuple(cases), base_interventions=base_ivs, n_prompts=n_prompts,
        seq_len=seq_len, n_layers=model.info.n_layers, logit_positions=logit_positions,
        budget_bytes=budget, bytes_per_case=per_case, max_per_chunk=cap, prefix_reuse=prefix,
        sequence_reuse=seq, from_resid=from_resid, starts=starts, offsets=offsets,
        resid_layers=tuple(sorted({s for s in starts if s > 0 or from_resid})) if prefix else (),
        chunks=(),
    )
    return dataclasses.replace(plan, chunks=_plan_chunks(plan, prefix, offsets))
