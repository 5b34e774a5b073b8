"""The runs a sweep reads from: patch sources, mean and resample references, and their caches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.model.sites import KV_KINDS, parse_site
from interp.patching.sweeps import MEAN, SOURCE, ZERO, Case, Sweep


def _check_tokens(model: LoadedModel, tokens: torch.Tensor, what: str = "tokens") -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.is_floating_point():
        raise UserError(f"{what} must be a [prompts, positions] tensor of token ids")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise UserError(f"{what} is empty")
    model.check_length(int(tokens.shape[1]))
    return tokens.to(model.device)


def _needed_sites(cases: Sequence[Case], source_name: str) -> list[str]:
    return sorted({str(iv.site) for v in cases for iv in v.edits if getattr(iv, "source", None) == source_name})


def _reference_tokens(sweep: Sweep, tokens: torch.Tensor, source: Any) -> Any:
    if source is not None:
        return source
    if sweep.intervention == "patch":
        raise UserError("a patch sweep needs a source run: give source= (tokens or a cache)")
    if sweep.intervention == "resample":
        if tokens.shape[0] < 2:
            raise UserError("resample ablation without a reference needs at least 2 prompts")
        return tokens.roll(1, dims=0)
    return tokens


def _reference(
    model: LoadedModel,
    sweep: Sweep,
    cases: Sequence[Case],
    tokens: torch.Tensor,
    source: torch.Tensor | Mapping[str, torch.Tensor] | None,
) -> torch.Tensor | Mapping[str, torch.Tensor] | None:
    """What the edits read from: the source run's checked token ids, a given cache, or None
    when no edit reads a source run or a reference mean."""
    need_src = _needed_sites(cases, SOURCE)
    if not (need_src or _needed_sites(cases, MEAN)):
        return None
    ref = _reference_tokens(sweep, tokens, source)
    if not isinstance(ref, torch.Tensor):
        return ref
    n_prompts, seq_len = tokens.shape
    src_tokens = _check_tokens(model, ref, "source tokens")
    if src_tokens.shape[1] != seq_len:
        raise UserError(f"source prompts have {src_tokens.shape[1]} tokens, base prompts {seq_len}")
    if src_tokens.shape[0] not in (1, n_prompts) and need_src:
        raise UserError(f"source has {src_tokens.shape[0]} prompts; give 1 or {n_prompts}")
    return src_tokens


def build_sources(
    model: LoadedModel,
    sweep: Sweep,
    cases: Sequence[Case],
    tokens: torch.Tensor,
    source: torch.Tensor | Mapping[str, torch.Tensor] | None,
    offload: bool = False,
) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor | None]:
    """The runs the edit templates read from, caching only the sites they name.

    Returns the sources mapping and the source run's tokens (None when a cache was given).
    """
    n_prompts, seq_len = tokens.shape
    sources: dict[str, dict[str, torch.Tensor]] = {}
    need_src = _needed_sites(cases, SOURCE)
    need_mean = _needed_sites(cases, MEAN)
    need_zero = _needed_sites(cases, ZERO)
    ref = _reference(model, sweep, cases, tokens, source)
    src_tokens = None
    ref_cache: Mapping[str, torch.Tensor] = {}
    if isinstance(ref, torch.Tensor):
        src_tokens = ref
        with torch.no_grad():
            ref_cache = model.run(src_tokens, cache=need_src + need_mean, cache_to_cpu=offload).cache
    elif ref is not None:
        ref_cache = ref
        missing = [s for s in need_src + need_mean if s not in ref_cache]
        if missing:
            raise UserError(f"source cache has no activation at site {missing[0]}")
    if need_src:
        sources[SOURCE] = {s: ref_cache[s] for s in need_src}
        for s, t in sources[SOURCE].items():
            if t.shape[0] not in (1, n_prompts) or t.shape[1] != seq_len:
                raise UserError(f"source activation at {s} has shape {tuple(t.shape)}; base is {n_prompts}x{seq_len}")
    if need_mean:
        sources[MEAN] = {
            s: ref_cache[s].mean(dim=(0, 1), keepdim=True).expand(1, seq_len, *ref_cache[s].shape[2:]).contiguous()
            for s in need_mean
        }
    if need_zero:
        shapes = _site_shapes(model, need_zero, seq_len)
        sources[ZERO] = {s: torch.zeros((1, *shapes[s]), dtype=model.dtype, device=model.device) for s in need_zero}
    return sources, src_tokens


def _site_shapes(model: LoadedModel, names: Sequence[str], seq_len: int) -> dict[str, tuple[int, ...]]:
    info = model.info
    out = {}
    for name in names:
        kind = parse_site(name).kind
        if kind in ("q", "z"):
            out[name] = (seq_len, info.n_heads, info.d_head)
        elif kind in KV_KINDS:
            out[name] = (seq_len, info.n_kv_heads, info.d_head)
        else:
            out[name] = (seq_len, info.d_model)
    return out


def _same_prefix(tokens: torch.Tensor, src_tokens: torch.Tensor | None) -> int:
    """How many leading positions the base and source prompts share in every row (0 when the
    source is a cache: its tokens are unknown)."""
    if src_tokens is None:
        return 0
    differs = (tokens != src_tokens.to(tokens.device)).any(dim=0)
    return int(differs.float().argmax()) if bool(differs.any()) else int(tokens.shape[1])
