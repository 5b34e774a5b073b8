"""What a sender writes into the residual stream, and how much that changes between two runs.

A head's output is its slice of the output projection's input (z) times its columns of W_O;
the heads of a layer and the projection's bias sum to the attention output. Where that output
joins the residual directly, a head's change between a base run and another run is

    d_h = (z_other_h - z_base_h) W_O,h^T.

Gemma 2/3 put a norm P between the attention output and the residual (Gemma Team 2024, sec. 2):
the layer adds P(S), S the sum of its heads' outputs (bias included). A head then has no
additive share; its change as the residual receives it is P(S_base + d_h) - P(S_base), with
every other head at its base value and P recomputed exactly (not linearised). Heads of one
layer changed together go through P together: P(S_base + sum d_h) - P(S_base), so all the
heads of every layer, the MLPs and ``embed`` together change the residual by exactly the
difference of the two runs' residuals. This is the treatment of the conflict-heads direct
path (``circuits.methods.direct_path``), generalised to any receiver.

An MLP's change is the difference of its outputs as they join the residual (after Gemma's
post-feedforward norm); ``embed``'s is the difference of the residuals entering layer 0.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

from interp.model.loaded import LoadedModel
from interp.patching.edges import Sender
from interp.patching.receivers import plain_call

Cache = Mapping[str, torch.Tensor]


class SenderMaps:
    """A model's output projections and post-attention norms, read once, on the model's device
    and dtype (the maps the forward pass itself applies)."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        info, layout = model.info, model.layout
        self.n_heads, self.d_head = info.n_heads, info.d_head
        self._w_o: dict[int, torch.Tensor] = {}
        self.post_norm = not layout.attn_out_direct

    def w_o(self, layer: int) -> torch.Tensor:
        """W_O of ``layer`` per head, [heads, d_head, d_model]: out = sum_h z_h @ w_o[h]."""
        if layer not in self._w_o:
            w = self.model.layout.weight(self.model.hf, "o", layer)  # [d_model, heads * d_head]
            w = w.to(self.model.device, self.model.dtype)
            self._w_o[layer] = w.T.reshape(self.n_heads, self.d_head, -1)
        return self._w_o[layer]

    def head_outputs(self, z: torch.Tensor, layer: int, heads: Sequence[int] | None = None) -> torch.Tensor:
        """Each head's output z_h W_O,h, [..., heads, d_model], from z [..., n_heads, d_head]."""
        w = self.w_o(layer)
        if heads is not None:
            idx = list(heads)
            z, w = z[..., idx, :], w[idx]
        return torch.einsum("...he,hed->...hd", z.to(w.dtype), w)

    def attn_pre_norm(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        """S: the attention output before the post-attention norm (the output projection on z)."""
        o = self.model.layout.module(self.model.hf, "o", layer)
        return plain_call(o, z.flatten(-2))

    def through_post_norm(self, s: torch.Tensor, change: torch.Tensor, layer: int) -> torch.Tensor:
        """P(s + change) - P(s) for ``change`` [..., d] broadcast against s (no norm: ``change``)."""
        if not self.post_norm:
            return change
        norm = self.model.layout.module(self.model.hf, "attn_post_norm", layer)
        return plain_call(norm, s + change) - plain_call(norm, s)

    def layer_heads_change(self, base_z: torch.Tensor, other_z: torch.Tensor, layer: int,
                           heads: Sequence[int]) -> torch.Tensor:
        """The residual change [n, p, d] when ``heads`` of ``layer`` take the other run's z
        together (every other head at its base value)."""
        d = self.head_outputs(other_z - base_z, layer, heads).sum(-2)
        if not self.post_norm:
            return d
        return self.through_post_norm(self.attn_pre_norm(base_z, layer), d, layer)

    def each_head_change(self, base_z: torch.Tensor, other_z: torch.Tensor, layer: int) -> torch.Tensor:
        """Every head's change alone, [heads, n, p, d] (vectorised :meth:`layer_heads_change`)."""
        d = self.head_outputs(other_z - base_z, layer).movedim(-2, 0)
        if not self.post_norm:
            return d
        return self.through_post_norm(self.attn_pre_norm(base_z, layer)[None], d, layer)


def sender_sites(senders: Sequence[Sender]) -> list[str]:
    """The cached sites a sender set's change is read from."""
    out = set()
    for s in senders:
        if s.kind == "embed":
            out.add("resid_pre.0")
        elif s.kind == "head":
            out.add(f"z.{s.layer}")
        else:
            out.add(f"mlp_out.{s.layer}")
    return sorted(out)


def group_change(maps: SenderMaps, base: Cache, other: Cache, group: Sequence[Sender]) -> torch.Tensor:
    """The residual change [n, p, d] when every sender of ``group`` takes its output from the
    ``other`` run and everything else keeps the ``base`` run's (heads of a layer through its
    post-attention norm together)."""
    heads: dict[int, list[int]] = defaultdict(list)
    total: torch.Tensor | None = None

    def add(t: torch.Tensor) -> None:
        nonlocal total
        total = t if total is None else total + t

    for s in group:
        if s.kind == "embed":
            add(other["resid_pre.0"] - base["resid_pre.0"])
        elif s.kind == "mlp":
            add(other[f"mlp_out.{s.layer}"] - base[f"mlp_out.{s.layer}"])
        else:
            heads[int(s.layer or 0)].append(int(s.head or 0))
    for layer, hs in sorted(heads.items()):
        add(maps.layer_heads_change(base[f"z.{layer}"], other[f"z.{layer}"], layer, hs))
    if total is None:
        raise ValueError("an empty sender group")
    return total


def block_changes(maps: SenderMaps, base: Cache, other: Cache,
                  blocks: Sequence[tuple[Sender, ...]]) -> torch.Tensor:
    """The change of each block of senders, [blocks, n, p, d]; single heads of one layer are
    computed together (one pass through the post-attention norm for all of them)."""
    singles: dict[int, list[int]] = defaultdict(list)
    for i, b in enumerate(blocks):
        if len(b) == 1 and b[0].kind == "head":
            singles[int(b[0].layer or 0)].append(i)
    out: list[torch.Tensor | None] = [None] * len(blocks)
    for layer, idx in singles.items():
        every = maps.each_head_change(base[f"z.{layer}"], other[f"z.{layer}"], layer)
        for i in idx:
            out[i] = every[int(blocks[i][0].head or 0)]
    for i, b in enumerate(blocks):
        if out[i] is None:
            out[i] = group_change(maps, base, other, b)
    return torch.stack([t for t in out if t is not None])


__all__ = ["SenderMaps", "block_changes", "group_change", "sender_sites"]
