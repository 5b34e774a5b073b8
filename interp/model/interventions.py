"""Interventions as data: which site, which heads/positions/batch rows, what change.

Every intervention is a frozen dataclass that serialises to a plain dict (``to_dict``) and
back (``from_dict``), so runs can be stored and replayed. Each names the one site it edits;
a backend groups interventions by site and applies them in list order inside one hook.

Indices: ``batch`` selects batch rows (None = all), ``positions`` selects positions (query
positions for attention sites), ``heads`` selects query heads (kv heads on k/v sites).
Per-query-head edits under grouped-query attention act on z or q, which are per query head,
never on the shared k/v projections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal

import torch

from interp.errors import UserError
from interp.model.sites import Site, parse_site

Index = tuple[int, ...] | None
Sources = Mapping[str, Mapping[str, torch.Tensor]]


def as_index(x: Sequence[int] | int | None) -> Index:
    """Indices as a tuple of ints (one int: a tuple of one), or None for "all"."""
    if x is None:
        return None
    if isinstance(x, int):
        return (int(x),)
    return tuple(int(i) for i in x)


def _index(x: torch.Tensor, site: Site, batch: Index, positions: Index, heads: Index) -> tuple[Any, ...]:
    """Advanced index selecting (batch rows, positions, heads) of a site's tensor.

    Every axis up to the last selected one gets its own index tensor (arange where nothing is
    selected), each on its own broadcast dimension, so getting and setting see the same shape
    [n_0, n_1, ..., rest] whatever the axis order of the site.
    """
    axes: dict[int, Index] = {0: batch, site.position_axis: positions}
    if heads is not None:
        if site.head_axis is None:
            raise UserError(f"site {site} has no head axis; drop 'heads'")
        axes[site.head_axis] = heads
    chosen = [a for a, v in axes.items() if v is not None]
    if not chosen:
        return (slice(None),)
    last = max(chosen)
    idx: list[Any] = []
    for axis in range(last + 1):
        values = axes.get(axis)
        n = x.shape[axis]
        if values is None:
            t = torch.arange(n, device=x.device)
        else:
            if any(not -n <= v < n for v in values):
                raise UserError(f"index out of range for site {site}: {list(values)} (axis size {n})")
            t = torch.tensor(values, dtype=torch.long, device=x.device)
        shape = [1] * (last + 1)
        shape[axis] = -1
        idx.append(t.view(shape))
    return tuple(idx)


@dataclass(frozen=True)
class Intervention:
    op: ClassVar[str]

    @property
    def site(self) -> Site:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, sources: Sources) -> torch.Tensor:
        """Return the edited activation (x may be modified in place; it is a private clone)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"op": self.op, **d}

    def check(self, n_layers: int, n_heads: int, n_kv_heads: int) -> None:
        site = self.site
        if site.layer is not None and not 0 <= site.layer < n_layers:
            raise UserError(f"layer {site.layer} out of range (0..{n_layers - 1})")
        heads = getattr(self, "heads", None)
        if heads is not None:
            limit = n_kv_heads if site.kind in ("k", "v") else n_heads
            bad = [h for h in heads if not 0 <= h < limit]
            if bad:
                raise UserError(f"head {bad[0]} out of range at layer {site.layer} (0..{limit - 1})")


def _source(sources: Sources, name: str, site: Site) -> torch.Tensor:
    if name not in sources:
        raise UserError(f"intervention needs source run {name!r}, which was not given")
    cache = sources[name]
    if str(site) not in cache:
        raise UserError(f"source run {name!r} has no cached activation at site {site}")
    return cache[str(site)]


@dataclass(frozen=True)
class Patch(Intervention):
    """Copy a site's activation (optionally a slice) from another run's cache."""

    op: ClassVar[str] = "patch"
    site_name: str
    source: str = "clean"
    heads: Index = None
    positions: Index = None
    batch: Index = None
    source_batch: Index = None

    @property
    def site(self) -> Site:
        return parse_site(self.site_name)

    def apply(self, x: torch.Tensor, sources: Sources) -> torch.Tensor:
        src = _source(sources, self.source, self.site).to(x.device, x.dtype)
        site = self.site
        if self.source_batch is not None:
            src = src[list(self.source_batch)]
        n_rows = x.shape[0] if self.batch is None else len(self.batch)
        if src.shape[0] not in (1, n_rows):
            raise UserError(
                f"patch source at {site} has batch {src.shape[0]}, target rows {n_rows}: give source_batch"
            )
        if src.shape[1:] != x.shape[1:]:
            raise UserError(f"patch source shape {tuple(src.shape)} does not match {tuple(x.shape)} at {site}")
        src = src.expand(n_rows, *src.shape[1:])
        idx = _index(x, site, self.batch, self.positions, self.heads)
        src_idx = _index(src, site, None, self.positions, self.heads)
        x[idx] = src[src_idx]
        return x


@dataclass(frozen=True)
class AblateHeads(Intervention):
    """Ablate query heads' outputs (z, before the output projection).

    method: "zero"; "mean" (mean over batch and positions of the reference run ``source``);
    "resample" (the same positions of the reference run, row by row).
    """

    op: ClassVar[str] = "ablate"
    layer: int
    heads: Index
    method: Literal["zero", "mean", "resample"] = "zero"
    source: str | None = None
    positions: Index = None
    batch: Index = None

    @property
    def site(self) -> Site:
        return Site("z", self.layer)

    def apply(self, x: torch.Tensor, sources: Sources) -> torch.Tensor:
        idx = _index(x, self.site, self.batch, self.positions, self.heads)
        if self.method == "zero":
            x[idx] = 0.0
            return x
        if self.source is None:
            raise UserError(f"{self.method} ablation needs a reference run (source=...)")
        ref = _source(sources, self.source, self.site).to(x.device, x.dtype)
        if self.method == "mean":
            mean = ref.mean(dim=(0, 1), keepdim=True).expand_as(x).contiguous()
            x[idx] = mean[idx]
            return x
        if self.method == "resample":
            if ref.shape[1:] != x.shape[1:]:
                raise UserError("resample ablation needs a reference run of the same sequence length")
            ref = ref.expand(x.shape[0], *ref.shape[1:]) if ref.shape[0] == 1 else ref
            if ref.shape[0] != x.shape[0]:
                raise UserError("resample reference must have batch 1 or the same batch as the run")
            x[idx] = ref[idx]
            return x
        raise UserError(f"unknown ablation method {self.method!r} (zero, mean, resample)")


@dataclass(frozen=True)
class UniformAttention(Intervention):
    """The retrieval-head mask of Wu et al.: zero the head's query, so its attention is
    uniform over the visible keys and it outputs the mean value."""

    op: ClassVar[str] = "uniform_attention"
    layer: int
    heads: Index
    batch: Index = None
    positions: Index = None

    @property
    def site(self) -> Site:
        return Site("q", self.layer)

    def apply(self, x: torch.Tensor, sources: Sources) -> torch.Tensor:
        x[_index(x, self.site, self.batch, self.positions, self.heads)] = 0.0
        return x


@dataclass(frozen=True)
class ScaleValue(Intervention):
    """Scale query heads' value vectors by ``factor`` (Yu, Merullo, Pavlick).

    A head's output is pattern @ V, so scaling its value vectors equals scaling its z; done on
    z it stays per query head under grouped-query attention, where V is shared by a group.
    """

    op: ClassVar[str] = "scale_value"
    layer: int
    heads: Index
    factor: float
    batch: Index = None
    positions: Index = None

    @property
    def site(self) -> Site:
        return Site("z", self.layer)

    def apply(self, x: torch.Tensor, sources: Sources) -> torch.Tensor:
        idx = _index(x, self.site, self.batch, self.positions, self.heads)
        x[idx] = x[idx] * self.factor
        return x


@dataclass(frozen=True)
class Knockout(Intervention):
    """Block attention edges (Geva et al.): scores from query positions to key positions
    are set to -inf before the softmax, for the given heads (None = all)."""

    op: ClassVar[str] = "knockout"
    layer: int
    query_positions: Index
    key_positions: Index
    heads: Index = None
    batch: Index = None

    @property
    def site(self) -> Site:
        return Site("scores", self.layer)

    def apply(self, x: torch.Tensor, sources: Sources) -> torch.Tensor:
        site = self.site
        idx = list(_index(x, site, self.batch, self.query_positions, self.heads))
        keys = torch.arange(x.shape[3], device=x.device) if self.key_positions is None else (
            torch.tensor(self.key_positions, device=x.device)
        )
        sub = x[tuple(idx)]
        sub[..., keys] = float("-inf")
        x[tuple(idx)] = sub
        # Backends mask future keys with -inf or with the dtype's minimum: count both as gone.
        visible = x > torch.finfo(x.dtype).min / 2
        if not bool(visible.any(dim=-1).all()):
            raise UserError(f"knockout at layer {self.layer} blocks every key of some query: nothing left to attend to")
        return x


@dataclass(frozen=True)
class AddNoise(Intervention):
    """Add Gaussian noise (ROME's corruption) to a site at some positions.

    The noise is ``std * torch.randn((rows, len(positions), d), generator=seeded)`` with a CPU
    generator seeded by ``seed``, so an independent implementation can draw the same numbers.
    """

    op: ClassVar[str] = "add_noise"
    site_name: str
    positions: Index
    std: float
    seed: int = 0
    batch: Index = None

    @property
    def site(self) -> Site:
        return parse_site(self.site_name)

    def apply(self, x: torch.Tensor, sources: Sources) -> torch.Tensor:
        rows = list(range(x.shape[0])) if self.batch is None else list(self.batch)
        pos = list(range(x.shape[1])) if self.positions is None else list(self.positions)
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((len(rows), len(pos), *x.shape[2:]), generator=gen) * self.std
        idx = _index(x, self.site, self.batch, self.positions, None)
        x[idx] = x[idx] + noise.to(x.device, x.dtype)
        return x


_OPS: dict[str, type[Intervention]] = {
    cls.op: cls for cls in (Patch, AblateHeads, UniformAttention, ScaleValue, Knockout, AddNoise)
}


def from_dict(d: Mapping[str, Any]) -> Intervention:
    d = dict(d)
    op = d.pop("op", None)
    if op not in _OPS:
        raise UserError(f"unknown intervention op {op!r} (known: {', '.join(_OPS)})")
    cls = _OPS[op]
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise UserError(f"unknown field {sorted(unknown)[0]!r} for intervention {op!r}")
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    return cls(**d)


def ablate_heads(
    heads: Sequence[tuple[int, int]],
    method: Literal["zero", "mean", "resample", "uniform"] = "zero",
    source: str | None = None,
    batch: Index = None,
) -> list[Intervention]:
    """Interventions that ablate (layer, head) pairs, one per layer."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    out: list[Intervention] = []
    for layer, hs in sorted(by_layer.items()):
        if method == "uniform":
            out.append(UniformAttention(layer=layer, heads=tuple(sorted(hs)), batch=batch))
        else:
            out.append(AblateHeads(layer=layer, heads=tuple(sorted(hs)), method=method, source=source, batch=batch))
    return out
