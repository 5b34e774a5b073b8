"""Named activation sites, the same for every backend.

A site is written ``kind.layer`` (``"z.5"``, ``"resid_pre.0"``) or just ``kind`` for
layer-less sites (``"embed"``). Shapes (b = batch, p = position, h = query heads,
g = kv heads, d = d_model, e = d_head):

- embed, resid_pre, resid_mid, resid_post, attn_out, mlp_out: [b, p, d]
- q, z: [b, p, h, e]  (q before rotary embedding, so zeroing it gives uniform attention)
- k, v: [b, p, g, e]  (per kv head under grouped-query attention)
- scores, pattern: [b, h, q_pos, k_pos]  (scores are masked, pre-softmax)
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from interp.errors import UserError

RESID_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_KINDS = ("q", "z")
KV_KINDS = ("k", "v")
ATTN_KINDS = ("scores", "pattern")
LAYER_KINDS = RESID_KINDS + HEAD_KINDS + KV_KINDS + ATTN_KINDS
GLOBAL_KINDS = ("embed",)
ALL_KINDS = GLOBAL_KINDS + LAYER_KINDS


@dataclass(frozen=True, order=True)
class Site:
    kind: str
    layer: int | None = None

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}.{self.layer}"

    @property
    def head_axis(self) -> int | None:
        """Axis that indexes heads, or None for whole-stream sites."""
        if self.kind in HEAD_KINDS or self.kind in KV_KINDS:
            return 2
        if self.kind in ATTN_KINDS:
            return 1
        return None

    @property
    def position_axis(self) -> int:
        """Axis that indexes (query) positions."""
        return 2 if self.kind in ATTN_KINDS else 1


def parse_site(text: str | Site, n_layers: int | None = None) -> Site:
    if isinstance(text, Site):
        site = text
    else:
        kind, _, layer = text.partition(".")
        if kind not in ALL_KINDS:
            raise UserError(f"unknown site kind {kind!r} in {text!r} (known: {', '.join(ALL_KINDS)})")
        if kind in GLOBAL_KINDS:
            if layer:
                raise UserError(f"site {kind!r} takes no layer")
            site = Site(kind)
        else:
            try:
                site = Site(kind, int(layer))
            except ValueError:
                raise UserError(f"site {text!r} needs an integer layer, like {kind}.0") from None
    if site.layer is not None and n_layers is not None and not 0 <= site.layer < n_layers:
        raise UserError(f"layer {site.layer} out of range in site {text!s} (0..{n_layers - 1})")
    return site


def expand_sites(patterns: list[str] | tuple[str, ...], n_layers: int) -> list[Site]:
    """Expand glob patterns (``"z.*"``, ``"resid_*.3"``) into concrete sites."""
    every = [Site(k) for k in GLOBAL_KINDS] + [
        Site(k, layer) for layer in range(n_layers) for k in LAYER_KINDS
    ]
    out: list[Site] = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            hits = [s for s in every if fnmatch.fnmatchcase(str(s), pat)]
            if not hits:
                raise UserError(f"site pattern {pat!r} matches no site")
            out.extend(hits)
        else:
            out.append(parse_site(pat, n_layers))
    return sorted(set(out), key=lambda s: (s.layer if s.layer is not None else -1, ALL_KINDS.index(s.kind)))
