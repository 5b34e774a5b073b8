"""Sweeps as data: which sites to edit and how (:class:`Sweep`), their cases, and the result."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from interp.errors import UserError
from interp.model.interventions import AblateHeads, Index, Intervention, Knockout, Patch, as_index
from interp.model.loaded import LoadedModel
from interp.model.sites import ATTN_KINDS, HEAD_KINDS, KV_KINDS, parse_site

SweepOver = Literal["heads", "layers", "positions", "windows"]


# What a sweep does at each site (stored with each result as its intervention).
Edit = Literal["patch", "zero", "mean", "resample", "knockout"]


OVERS: tuple[str, ...] = ("heads", "layers", "positions", "windows")


EDITS: tuple[str, ...] = ("patch", "zero", "mean", "resample", "knockout")


DEFAULT_SITE = {"heads": "z", "layers": "resid_pre", "positions": "resid_pre", "windows": "mlp_out"}


# Names of the runs the edit templates read from (keys of the ``sources`` mapping).
SOURCE = "source"


MEAN = "mean"


ZERO = "zero"


@dataclass
class Case:
    """One swept site: its label and the edit templates (no batch rows yet)."""

    label: dict[str, int]
    edits: tuple[Intervention, ...]

    @property
    def start_layer(self) -> int:
        """The lowest layer edited: everything below it is the base run's."""
        layers = [iv.site.layer for iv in self.edits]
        return 0 if any(layer is None for layer in layers) else min(int(x) for x in layers if x is not None)

    def start_position(self, seq_len: int, same_prefix: int = 0) -> int:
        """The lowest position the edits change, when every edit is a patch or head ablation
        on the position axis (else 0): with causal attention every earlier position is the
        base run's. ``same_prefix``: the base and source runs have the same tokens there, so
        a patch from the source cannot change those positions."""
        lows = []
        for iv in self.edits:
            pos = getattr(iv, "positions", None)
            if not isinstance(iv, Patch | AblateHeads) or iv.site.position_axis != 1:
                return 0
            low = 0 if pos is None else min(_norm_pos(p, seq_len) for p in pos)
            if isinstance(iv, Patch) and iv.source == SOURCE:
                low = max(low, same_prefix)
            lows.append(low)
        return min(lows, default=0)


@dataclass(frozen=True)
class Sweep:
    """For each site, apply one intervention; see the module docstring for the interventions.

    - ``over="heads"``: one case per (layer, head) at a per-head site (z by default), at
      ``positions`` (None: all).
    - ``over="layers"``: one case per layer at a whole-stream site (resid_pre by default),
      at ``positions``; with ``heads`` on a head site, those heads together.
    - ``over="positions"``: one case per (layer, position) (causal tracing's grid).
    - ``over="windows"``: one case per (layer, position), editing layers
      [L - window//2, L + ceil(window/2)) clipped to the model (ROME's windows; mlp_out default).
    - ``intervention="knockout"``: attention edges from ``query_positions`` to the key
      positions (``positions``; swept one by one under positions/windows) are blocked.
    """

    over: SweepOver
    intervention: Edit = "patch"
    site: str | None = None
    layers: Index = None
    heads: Index = None
    positions: Index = None
    window: int = 10
    query_positions: tuple[int, ...] = (-1,)

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "positions", "query_positions"):
            object.__setattr__(self, name, as_index(getattr(self, name)))
        if self.over not in OVERS:
            raise UserError(f"unknown sweep {self.over!r} (known: {', '.join(OVERS)})")
        if self.intervention not in EDITS:
            raise UserError(f"unknown intervention {self.intervention!r} (known: {', '.join(EDITS)})")
        if self.window < 1:
            raise UserError(f"window must be at least 1 layer, got {self.window}")

    @property
    def site_kind(self) -> str:
        if self.intervention == "knockout":
            if self.site not in (None, "scores"):
                raise UserError("knockout acts on attention scores; leave site unset")
            return "scores"
        kind = self.site or DEFAULT_SITE[self.over]
        if kind in ATTN_KINDS:
            raise UserError(f"sweeps edit activations, not {kind!r}; use intervention='knockout' for attention edges")
        parse_site(kind if kind == "embed" else f"{kind}.0")
        if self.over == "heads" and kind not in HEAD_KINDS + KV_KINDS:
            raise UserError(f"a heads sweep needs a per-head site (q, k, v, z), not {kind!r}")
        if kind == "embed" and self.over in ("layers", "windows"):
            raise UserError("embed has no layers; sweep positions over it with over='positions'")
        return kind

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sweep:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"unknown sweep field {sorted(unknown)[0]!r}")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def cases(self, model: LoadedModel, seq_len: int) -> list[Case]:
        info = model.info
        kind = self.site_kind
        layers = self.layers if self.layers is not None else tuple(range(info.n_layers))
        for layer in layers:
            if not 0 <= layer < info.n_layers:
                raise UserError(f"layer {layer} out of range: {model.name} has layers 0..{info.n_layers - 1}")
        n_heads = info.n_kv_heads if kind in KV_KINDS else info.n_heads
        heads = self.heads
        for h in heads or ():
            if not 0 <= h < n_heads:
                raise UserError(f"head {h} out of range at site {kind} (0..{n_heads - 1})")
        if heads is not None and kind not in HEAD_KINDS + KV_KINDS + ("scores",):
            raise UserError(f"site {kind!r} has no heads; drop heads=")
        positions = None if self.positions is None else tuple(_norm_pos(p, seq_len) for p in self.positions)
        qpos = tuple(_norm_pos(p, seq_len) for p in self.query_positions)

        if self.intervention == "knockout":
            return self._knockout_cases(layers, heads, positions, qpos, seq_len, info.n_layers, n_heads)

        def edit(layer: int | None, hs: Index, pos: Index) -> Intervention:
            name = kind if layer is None else f"{kind}.{layer}"
            if self.intervention == "zero" and kind == "z":
                return AblateHeads(layer=int(layer or 0), heads=hs, method="zero", positions=pos)
            src = {"patch": SOURCE, "resample": SOURCE, "mean": MEAN, "zero": ZERO}[self.intervention]
            return Patch(site_name=name, source=src, heads=hs, positions=pos)

        out: list[Case] = []
        if self.over == "heads":
            for layer in layers:
                for h in heads if heads is not None else range(n_heads):
                    out.append(Case({"layer": layer, "head": h}, (edit(layer, (h,), positions),)))
        elif self.over == "layers":
            for layer in layers:
                out.append(Case({"layer": layer}, (edit(layer, heads, positions),)))
        else:
            swept = positions if positions is not None else tuple(range(seq_len))
            if kind == "embed":
                return [Case({"position": p}, (edit(None, heads, (p,)),)) for p in swept]
            for layer in layers:
                win = window_layers(layer, self.window, info.n_layers) if self.over == "windows" else (layer,)
                for p in swept:
                    out.append(Case({"layer": layer, "position": p}, tuple(edit(w, heads, (p,)) for w in win)))
        return out

    def _knockout_cases(
        self, layers: Sequence[int], heads: Index, positions: Index, qpos: tuple[int, ...], seq_len: int,
        n_layers: int, n_heads: int,
    ) -> list[Case]:
        def ko(layer: int, hs: Index, keys: tuple[int, ...]) -> Intervention:
            return Knockout(layer=layer, query_positions=qpos, key_positions=keys, heads=hs)

        if self.over in ("heads", "layers"):
            if positions is None:
                raise UserError("a knockout over heads or layers needs the key positions to block (positions=...)")
            if self.over == "heads":
                return [
                    Case({"layer": layer, "head": h}, (ko(layer, (h,), positions),))
                    for layer in layers
                    for h in (heads if heads is not None else range(n_heads))
                ]
            return [Case({"layer": layer}, (ko(layer, heads, positions),)) for layer in layers]
        swept = positions if positions is not None else tuple(range(seq_len))
        out = []
        for layer in layers:
            win = window_layers(layer, self.window, n_layers) if self.over == "windows" else (layer,)
            for p in swept:
                out.append(Case({"layer": layer, "position": p}, tuple(ko(w, heads, (p,)) for w in win)))
        return out


def window_layers(layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """The window of ``window`` layers around ``layer`` that causal tracing restores together:
    [L - w//2, L + ceil(w/2)), clipped to the model (Meng et al. 2022, ROME, the
    ``trace_important_window`` of their code)."""
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def _norm_pos(p: int, seq_len: int) -> int:
    if not -seq_len <= p < seq_len:
        raise UserError(f"position {p} out of range for prompts of {seq_len} tokens")
    return p % seq_len


@dataclass
class SweepResult:
    """Metric values per case and prompt, with the base run's and the execution record."""

    sweep: Sweep
    intervention: str
    metric: str
    labels: list[dict[str, int]]
    values: torch.Tensor  # [n_cases, n_prompts]: the metric with the case's edit
    base: torch.Tensor  # [n_prompts]: the metric of the unedited base run
    stats: dict[str, Any] = field(default_factory=dict)

    def mean(self) -> torch.Tensor:
        return self.values.mean(dim=1)

    def effect(self) -> torch.Tensor:
        """Per case: mean over prompts of (edited - base)."""
        return (self.values - self.base[None, :]).mean(dim=1)

    def to_frame(self) -> Any:
        import pandas as pd

        rows = []
        for i, label in enumerate(self.labels):
            for j in range(self.values.shape[1]):
                rows.append({**label, "prompt": j, "value": float(self.values[i, j]), "base": float(self.base[j])})
        df = pd.DataFrame(rows)
        df["intervention"] = self.intervention
        df["metric"] = self.metric
        return df
