"""Attribution patching (Nanda 2023) and "estimate then confirm" with the patching engine.

The first-order estimate of a case's effect on the metric is

    delta_metric ~= sum over edited sites of (a_edited - a_base) . d metric / d a |base

for every case of a :class:`~interp.patching.execution.Sweep` at once, from one forward pass of the
base run with gradients, one forward pass of the source run and one backward pass.
``a_edited`` is what the case's own intervention template writes (the source run's
activation for patching, zero, the reference mean, the resampled row), so the estimate and
the exact engine run describe the same edit. It is a linearisation: it misses effects through
saturated attention softmaxes and other strong non-linearities (AtP*, Kramar et al. 2024);
:func:`estimate_then_confirm` therefore re-runs the top candidates exactly and reports the
agreement (Spearman rank correlation, top-k overlap, sign agreement).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.patching.execution import run_sweep
from interp.patching.forwards import SweepForwards
from interp.patching.metrics import Metric, _check_metric
from interp.patching.sources import _check_tokens, build_sources
from interp.patching.sweeps import Sweep, SweepResult


@dataclass
class AttributionResult:
    sweep: Sweep
    variant: str
    metric: str
    labels: list[dict[str, int]]
    estimates: torch.Tensor  # [n_cases, n_prompts]: estimated (edited - base) metric
    base: torch.Tensor  # [n_prompts]
    stats: dict[str, Any] = field(default_factory=dict)

    def mean(self) -> torch.Tensor:
        return self.estimates.mean(dim=1)


def attribution_patch(
    model: LoadedModel,
    sweep: Sweep,
    metric: Metric,
    tokens: torch.Tensor,
    source: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
) -> AttributionResult:
    """First-order estimates of every case's effect, from 2 forward passes and 1 backward."""
    t0 = time.perf_counter()
    if sweep.intervention == "knockout":
        raise UserError("attribution patching does not cover knockout: -inf scores have no first-order estimate")
    tokens = _check_tokens(model, tokens)
    n_prompts, seq_len = tokens.shape
    _check_metric(metric, n_prompts)
    cases = sweep.cases(model, seq_len)
    with torch.no_grad():
        sources, _ = build_sources(model, sweep, cases, tokens, source)
    sites = sorted({str(iv.site) for v in cases for iv in v.edits})
    runner = SweepForwards(model, metric, seq_len)
    with torch.enable_grad():
        logits, cache, _ = runner.forward(tokens, cache=sites, grad=True)
        acts = [cache[s] for s in sites]
        if not all(a.requires_grad for a in acts):
            raise UserError("attribution patching needs gradients: the model's parameters have requires_grad=False")
        base = runner.metric(logits, torch.arange(n_prompts, device=model.device))
        # Rows are independent prompts, so the gradient of the sum is each prompt's gradient.
        grads = torch.autograd.grad(base.sum(), acts)
    grad_of = {s: g.detach() for s, g in zip(sites, grads, strict=True)}
    act_of = {s: a.detach() for s, a in zip(sites, acts, strict=True)}
    est = torch.zeros(len(cases), n_prompts, dtype=torch.float64)
    with torch.no_grad():
        for i, v in enumerate(cases):
            total = torch.zeros(n_prompts, device=model.device)
            for iv in v.edits:
                name = str(iv.site)
                a = act_of[name]
                edited = iv.apply(a.clone(), sources)
                total += ((edited - a) * grad_of[name]).flatten(1).sum(dim=1)
            est[i] = total.double().cpu()
    return AttributionResult(
        sweep=sweep, variant=f"attribution-{sweep.intervention}", metric=metric.name,
        labels=[v.label for v in cases], estimates=est, base=base.detach().double().cpu(),
        stats={"n_cases": len(cases), "sites": len(sites), "seconds": time.perf_counter() - t0},
    )


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    if x.numel() < 2:
        return float("nan")
    return float(spearmanr(x.numpy(), y.numpy()).statistic)  # type: ignore[attr-defined]


def top_k_overlap(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """Share of the k largest |x| that are among the k largest |y|."""
    k = min(k, x.numel())
    a = set(x.abs().topk(k).indices.tolist())
    b = set(y.abs().topk(k).indices.tolist())
    return len(a & b) / k


@dataclass
class Confirmation:
    attribution: AttributionResult
    exact: SweepResult  # the confirmed cases only, in the order of ``confirmed``
    confirmed: list[int]  # case indices run exactly
    spearman_confirmed: float  # estimate vs exact effect over the confirmed cases
    spearman_all: float | None  # over every case (confirm="all")
    top_k: int
    top_k_overlap: float | None  # top-k by |estimate| vs top-k by |exact| (confirm="all")
    sign_agreement: float  # over the confirmed cases with a non-zero exact effect

    def table(self) -> Any:
        import pandas as pd

        est = self.attribution.mean()
        exact = self.exact.effect()
        return pd.DataFrame(
            [
                {**self.attribution.labels[vi], "estimate": float(est[vi]), "exact": float(exact[j])}
                for j, vi in enumerate(self.confirmed)
            ]
        )


def estimate_then_confirm(
    model: LoadedModel,
    sweep: Sweep,
    metric: Metric,
    tokens: torch.Tensor,
    source: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    *,
    top_k: int = 20,
    confirm: Literal["top", "all"] = "top",
    **engine_kwargs: Any,
) -> Confirmation:
    """Attribution estimates for every case, then exact patching of the ``top_k`` by
    |estimate| (or of all, which also gives the rank correlation over all and top-k overlap)."""
    if top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    if confirm not in ("top", "all"):
        raise UserError(f"confirm must be 'top' or 'all', got {confirm!r}")
    att = attribution_patch(model, sweep, metric, tokens, source)
    est = att.mean()
    k = min(top_k, est.numel())
    chosen: Sequence[int] = (
        list(range(est.numel())) if confirm == "all" else est.abs().topk(k).indices.tolist()
    )
    exact = run_sweep(model, sweep, metric, tokens, source, select=chosen, **engine_kwargs)
    exact_eff = exact.effect()
    est_sel = est[list(chosen)]
    nonzero = exact_eff != 0
    signs = (torch.sign(est_sel[nonzero]) == torch.sign(exact_eff[nonzero])).float()
    top = est.abs().topk(k).indices.tolist()
    return Confirmation(
        attribution=att,
        exact=exact,
        confirmed=list(chosen),
        spearman_confirmed=spearman(est[top], exact_eff[[list(chosen).index(i) for i in top]]),
        spearman_all=spearman(est, exact_eff) if confirm == "all" else None,
        top_k=k,
        top_k_overlap=top_k_overlap(est, exact_eff, k) if confirm == "all" else None,
        sign_agreement=float(signs.mean()) if signs.numel() else float("nan"),
    )


__all__ = ["AttributionResult", "Confirmation", "attribution_patch", "estimate_then_confirm", "spearman", "top_k_overlap"]
