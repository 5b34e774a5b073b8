"""A batched patching engine: sweeps as data, executed as few large forward passes.

A :class:`Sweep` says *what* to do: for each site (a head, a layer, a (layer, position) cell,
or a window of layers at a position), apply one intervention (patch from a source run,
zero / mean / resample ablation, attention knockout) and measure a :class:`Metric`.
:func:`run_sweep` decides *how*: :func:`plan_sweep` makes a :class:`SweepPlan` (cases,
chunks, reuse decisions, budget) before any forward pass, :func:`execute_plan` runs it:

- every case (one site's edit) becomes a block of rows (one per prompt) in the batch
  dimension, through the interventions' ``batch=`` field, so one forward pass evaluates
  many cases;
- cases are grouped by the lowest layer they edit; a chunk starting at layer L hands the
  base run's cached ``resid_pre.L`` to the backend's ``run_from_layer`` (where its
  capabilities offer it), which does not compute the layers below L, so the shared prefix is
  computed once, by the base run, instead of once per case;
- a case that can change only positions >= p (a patch or head ablation at some positions,
  or a patch from a source whose prompts equal the base prompts up to p, as a conflict prompt
  and its consistent twin do) computes positions p.. only, attending to the base run's KV
  cache of 0..p-1; the layer and position re-entry is checked once per sweep against a full
  pass, with a fallback to full passes;
- ``base_interventions`` belong to the base run (ROME's embedding noise) and so to every case;
- chunks are sized to a memory budget in bytes (default: a quarter of the free memory);
- logits are computed only at the positions the metric reads (HF's ``logits_to_keep``) and,
  for a logit difference, only for its tokens; the metric is evaluated on the device and read
  back once per chunk.

Case names stored with every result: ``patch`` (activation patching from ``source``),
``zero``, ``mean`` (mean over batch and positions of the reference run, like
``AblateHeads(method="mean")``), ``resample`` (the same positions of the reference run, prompt
i taking reference row i; the default reference is the base prompts rolled by one), and
``knockout`` (scores from ``query_positions`` to the swept key positions set to -inf).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from interp.model.interventions import Intervention, Patch
from interp.model.loaded import LoadedModel
from interp.patching.forwards import SweepForwards, _plain_kv, _prefix_kv
from interp.patching.metrics import Metric
from interp.patching.planning import SweepPlan, plan_sweep
from interp.patching.sources import _check_tokens, build_sources
from interp.patching.sweeps import Sweep, SweepResult, _norm_pos

# --------------------------------------------------------------------------- execution


def _shifted(iv: Intervention, offset: int, seq_len: int) -> Intervention:
    """The edit in a pass that starts at position ``offset``."""
    pos = getattr(iv, "positions", None)
    if not offset or pos is None:
        return iv
    return dataclasses.replace(iv, positions=tuple(_norm_pos(p, seq_len) - offset for p in pos))  # type: ignore[call-arg]


def _cut_sources(sources: Mapping[str, Mapping[str, torch.Tensor]], offset: int,
                 seq_len: int) -> dict[str, dict[str, torch.Tensor]]:
    """Source activations from position ``offset`` on (position axis 1, as the edits that
    allow a cut prefix require)."""
    return {
        name: {site: t[:, offset:] if t.ndim > 1 and t.shape[1] == seq_len else t for site, t in acts.items()}
        for name, acts in sources.items()
    }


def _with_rows(iv: Intervention, rows: tuple[int, ...], sources: Mapping[str, Mapping[str, torch.Tensor]],
               n_prompts: int) -> Intervention:
    own = getattr(iv, "batch", None)
    if own is not None:
        # A base edit on some prompts: the same prompts of this case's block.
        rows = tuple(rows[b] for b in own)
    if isinstance(iv, Patch):
        src = sources[iv.source][iv.site_name]
        return dataclasses.replace(iv, batch=rows, source_batch=tuple(range(n_prompts)) if src.shape[0] > 1 else None)
    return dataclasses.replace(iv, batch=rows)  # type: ignore[call-arg]


# --------------------------------------------------------------------------- plans


# --------------------------------------------------------------------------- execution of a plan


def _base_run(
    plan: SweepPlan, runner: SweepForwards, tokens: torch.Tensor, sources: Mapping[str, Mapping[str, torch.Tensor]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any, SweepPlan]:
    """The base run: its metric, the residuals chunks enter at, its KV cache, and the plan
    without sequence reuse when that cache cannot be cut at a position."""
    logits, base_cache, base_kv = runner.forward(
        tokens, plan.base_interventions, sources, cache=[f"resid_pre.{s}" for s in plan.resid_layers],
        keep_kv=plan.sequence_reuse,
    )
    base = runner.metric(logits, torch.arange(plan.n_prompts, device=tokens.device))
    if plan.sequence_reuse and not _plain_kv(base_kv):
        plan = plan.without_sequence_reuse()
    return base, base_cache, base_kv, plan


def _check_reentry(
    model: LoadedModel, plan: SweepPlan, runner: SweepForwards, tokens: torch.Tensor, base: torch.Tensor,
    base_cache: Mapping[str, torch.Tensor], base_kv: Any,
) -> tuple[SweepPlan, float | None]:
    """Layer (and position) re-entry is checked once per sweep on this model: resuming the
    base run at the highest start layer, after the largest cut, must give the base metric
    back; otherwise the plan falls back to full passes. Returns the plan and the difference."""
    if not plan.resid_layers:
        return plan, None
    top, cut = plan.resid_layers[-1], max(plan.offsets)
    past = _prefix_kv(model, base_kv, cut, 1) if cut else None
    again, _, _ = runner.forward(tokens, start=top, resid=base_cache[f"resid_pre.{top}"][:, cut:], past=past,
                                 offset=cut)
    diff = float((runner.metric(again, torch.arange(plan.n_prompts, device=tokens.device)) - base).abs().max())
    if diff > 1e-4 * (1.0 + float(base.abs().max())):
        # stacklevel: the caller of run_sweep.
        warnings.warn(f"prefix reuse disagrees with a full forward on {model.name} "
                      f"(max diff {diff:.2g}); running full forwards", stacklevel=4)
        plan = plan.without_reuse()
    return plan, diff


def _run_chunks(
    model: LoadedModel, plan: SweepPlan, runner: SweepForwards, tokens: torch.Tensor,
    sources: Mapping[str, Mapping[str, torch.Tensor]], base_cache: Mapping[str, torch.Tensor], base_kv: Any,
) -> torch.Tensor:
    """Metric values [cases, prompts], one forward pass per chunk."""
    n_prompts, seq_len = plan.n_prompts, plan.seq_len
    prompt_index = torch.arange(n_prompts, device=tokens.device)
    values = torch.empty(len(plan.cases), n_prompts, dtype=torch.float64)
    cut_sources: dict[int, Mapping[str, Mapping[str, torch.Tensor]]] = {0: sources}
    for chunk in plan.chunks:
        off, start, idx = chunk.offset, chunk.start, list(chunk.cases)
        if off not in cut_sources:
            cut_sources[off] = _cut_sources(sources, off, seq_len)
        resid = None
        if plan.prefix_reuse and (start > 0 or plan.from_resid):
            resid = base_cache[f"resid_pre.{start}"][:, off:].repeat(len(idx), 1, 1)
        ivs: list[Intervention] = []
        for slot, vi in enumerate(idx):
            rows = tuple(range(slot * n_prompts, (slot + 1) * n_prompts))
            if resid is None:
                ivs.extend(_with_rows(iv, rows, sources, n_prompts) for iv in plan.base_interventions)
            ivs.extend(_with_rows(_shifted(iv, off, seq_len), rows, sources, n_prompts)
                       for iv in plan.cases[vi].edits)
        batch_tokens = tokens[:, off:].repeat(len(idx), 1)
        past = _prefix_kv(model, base_kv, off, len(idx)) if off else None
        logits, _, _ = runner.forward(batch_tokens, ivs, cut_sources[off], start=start, resid=resid,
                                      past=past, offset=off)
        vals = runner.metric(logits, prompt_index.repeat(len(idx)))
        values[idx] = vals.view(len(idx), n_prompts).double().cpu()
    return values


def execute_plan(
    model: LoadedModel,
    plan: SweepPlan,
    metric: Metric,
    tokens: torch.Tensor,
    source: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    *,
    offload: bool = False,
) -> SweepResult:
    """Run ``plan`` (from :func:`plan_sweep` with the same metric, tokens and source)."""
    t0 = time.perf_counter()
    tokens = _check_tokens(model, tokens)
    runner = SweepForwards(model, metric, plan.seq_len)
    with torch.no_grad():
        sources, _ = build_sources(model, plan.sweep, plan.cases, tokens, source, offload)
        base, base_cache, base_kv, plan = _base_run(plan, runner, tokens, sources)
        plan, prefix_diff = _check_reentry(model, plan, runner, tokens, base, base_cache, base_kv)
        values = _run_chunks(model, plan, runner, tokens, sources, base_cache, base_kv)
    cache_bytes = sum(t.numel() * t.element_size() for t in base_cache.values()) + sum(
        t.numel() * t.element_size() for c in sources.values() for t in c.values()
    )
    stats = {
        "n_cases": len(plan.cases),
        "chunks": len(plan.chunks),
        "chunk_sizes": [len(c.cases) for c in plan.chunks],
        "forwards": runner.forwards,
        "token_layers": runner.token_layers,
        "prefix_reuse": plan.prefix_reuse,
        "sequence_reuse": plan.sequence_reuse,
        "prefix_check_diff": prefix_diff,
        "logits_positions": runner.n_logit_positions,
        "budget_bytes": plan.budget_bytes,
        "bytes_per_case": plan.bytes_per_case,
        "cache_bytes": cache_bytes,
        "seconds": time.perf_counter() - t0,
    }
    sweep = plan.sweep
    return SweepResult(
        sweep=sweep, intervention=sweep.intervention, metric=metric.name, labels=[v.label for v in plan.cases],
        values=values, base=base.double().cpu(), stats=stats,
    )


def run_sweep(
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
    offload: bool = False,
    select: Sequence[int] | None = None,
    base_interventions: Sequence[Intervention] = (),
) -> SweepResult:
    """Run every case of ``sweep`` on ``tokens`` (the base run) and measure ``metric``.

    ``source``: the source run for patching, or the reference for mean/resample ablation,
    as token ids ([prompts or 1, positions]) or as a cache {site: tensor}. ``budget_bytes``:
    memory for one chunk's activations (default a quarter of the free memory);
    ``max_cases`` caps cases per chunk; ``select`` runs only those case indices.
    ``base_interventions`` are part of the base run itself (ROME's embedding noise): every
    case sees them, each prompt row with its own row's edit.
    ``prefix_reuse``: start each chunk at its lowest edited layer from the base run's residual.
    ``sequence_reuse``: when a case edits only positions >= p (and the metric reads no
    earlier position), compute positions p.. only, on the base run's KV cache of 0..p-1.
    The plan (:func:`plan_sweep`) is made first, then executed (:func:`execute_plan`).
    """
    t0 = time.perf_counter()
    plan = plan_sweep(
        model, sweep, metric, tokens, source, budget_bytes=budget_bytes, max_cases=max_cases,
        prefix_reuse=prefix_reuse, sequence_reuse=sequence_reuse, select=select,
        base_interventions=base_interventions,
    )
    result = execute_plan(model, plan, metric, tokens, source, offload=offload)
    result.stats["seconds"] = time.perf_counter() - t0
    return result


__all__ = ["execute_plan", "run_sweep"]
