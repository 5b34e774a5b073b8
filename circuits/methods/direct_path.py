"""A head's direct path to the logits (Jin et al. 2024; Wang et al. 2022), through Gemma's
post-attention norm exactly, and the total effects it is compared with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from circuits.data.conflicts import (
    ConflictItem,
    check_format,
    grouped_by_length,
)
from circuits.methods.heads import all_heads
from interp.errors import UserError
from interp.model.interventions import Intervention, Patch
from interp.model.layout import tensor_of
from interp.model.loaded import LoadedModel

FROZEN = (
    "path patching freezes every component except the sender at its conflict-run value: all other "
    "heads of every layer, all MLPs, and all layers after the sender; the sender's output at the final "
    "position is replaced by its no-conflict output; the receiver is the final residual stream at the "
    "final position"
)


def out_proj_module(model: LoadedModel, layer: int) -> torch.nn.Module:
    """The module whose input is z (heads concatenated) and output the attention output: the
    one the forward pass calls (the bridge's wrapper on a bridged model), for hooks."""
    return model.layout.module(model.hf, "o", layer, live=True)


def output_weights(model: LoadedModel) -> torch.Tensor:
    """W_O per head, [layers, heads, d_head, d_model], such that out = sum_h z_h @ W_O[l, h]."""
    info = model.info
    mats = []
    for layer in range(info.n_layers):
        w_out_in = model.layout.weight(model.hf, "o", layer).float().cpu()  # a device map spreads the layers
        mats.append(w_out_in.T.reshape(info.n_heads, info.d_head, info.d_model))
    return torch.stack(mats)


class AttnPostNorm:
    """The norm some families (Gemma) put between the attention output and the residual.

    A head's output z_h W_O is then no additive share of the residual: the layer adds
    P(S) = S / rms(S) * g, where S is the sum of its heads' outputs. The direct path of a head
    goes through P recomputed on S with that head's output changed (exact); the frozen-norm
    variant and DLA freeze P's scale at the conflict run's S, so a layer's DLA still sums to P(S).
    """

    def __init__(self, model: LoadedModel) -> None:
        hf, layout = model.hf, model.layout
        n = model.info.n_layers
        self.norms = [layout.module(hf, "attn_post_norm", layer) for layer in range(n)]
        self.gain = torch.stack([layout.norm_scale(hf, "attn_post_norm", layer).float().cpu() for layer in range(n)])
        outs = [layout.module(hf, "o", layer) for layer in range(n)]
        self.o_bias = torch.stack([torch.zeros(model.info.d_model) if getattr(o, "bias", None) is None
                                   else tensor_of(o, "bias").float().cpu() for o in outs])
        eps = [getattr(m, "eps", getattr(m, "variance_epsilon", None)) for m in self.norms]
        if any(e is None or isinstance(m, torch.nn.LayerNorm) for e, m in zip(eps, self.norms, strict=True)):
            raise UserError(f"{model.name}: post-attention norm {type(self.norms[0]).__name__} is not an "
                            "RMS norm with an eps; direct-path patching does not support it")
        self.eps = torch.tensor([float(e) for e in eps])  # type: ignore[arg-type]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Each layer's norm on x [L, ..., d] (the attention output, bias included), as the model runs it."""
        out = []
        with torch.no_grad():
            for layer, norm in enumerate(self.norms):
                p = next(norm.parameters())
                out.append(norm(x[layer].to(p.device, p.dtype)).float().cpu())
        return torch.stack(out)

    def frozen(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x [L, H, d] through each layer's norm with its scale frozen at s [L, d]."""
        rms = (s.pow(2).mean(-1, keepdim=True) + self.eps[:, None]).sqrt()  # [L, 1]
        return x * (self.gain / rms)[:, None, :]

    def check(self, model: LoadedModel, s: torch.Tensor) -> None:
        """The frozen map must reproduce the norm at the point it was frozen at."""
        exact = self.apply(s)
        frozen = self.frozen(s[:, None], s)[:, 0]
        err = float((frozen - exact).abs().max() / max(1.0, float(exact.abs().max())))
        if err > 1e-4:
            raise UserError(f"{model.name}: post-attention norm {type(self.norms[0]).__name__} is not a plain "
                            f"RMS norm (frozen-scale error {err:.3g}); direct-path patching does not support it")


def _through_post_norm(
    post: AttnPostNorm | None, out_c: torch.Tensor, delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per head [L, H, d]: (the exact residual change of patching it, the frozen-norm one, its
    conflict-run output as the residual receives it). Without a post-attention norm all three
    are the head's own outputs."""
    if post is None:
        return delta, delta, out_c
    s = out_c.sum(1) + post.o_bias  # [L, d]: the attention output entering the norm
    base = post.apply(s)[:, None]
    exact = post.apply(s[:, None] + delta) - base
    return exact, post.frozen(delta, s), post.frozen(out_c, s)


class FinalReadout:
    """The final norm and unembedding, applied to a residual vector at one position."""

    def __init__(self, model: LoadedModel) -> None:
        # The plain HF modules (under any bridge wrapper): the norm is called directly below.
        self.norm = model.layout.module(model.hf, "final_norm")
        unembed = model.layout.module(model.hf, "unembed")
        self.w_u = tensor_of(unembed).float().cpu()
        self.b_u = None if getattr(unembed, "bias", None) is None else tensor_of(unembed, "bias").float().cpu()
        self.layernorm = isinstance(self.norm, torch.nn.LayerNorm)
        eps = getattr(self.norm, "variance_epsilon", None)
        if eps is None:
            eps = getattr(self.norm, "eps", None)
        if eps is None:
            raise UserError(f"final norm {type(self.norm).__name__} has no eps: unsupported")
        self.eps = float(eps)
        d = model.info.d_model
        with torch.no_grad():
            if self.layernorm:
                self.weight = tensor_of(self.norm).float().cpu()
                self.bias = tensor_of(self.norm, "bias").float().cpu() if self.norm.bias is not None else None
            else:
                # RMS norms differ in how they apply their weight (Gemma uses 1 + w); reading the
                # effective weight off a probe of known RMS covers them all.
                probe = torch.full((1, d), 1e3)
                self.weight = (self.norm(probe.to(model.device, model.dtype)).float().cpu()[0]
                               * (1e6 + self.eps) ** 0.5 / 1e3)
                self.bias = None

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm itself, recomputed on x [..., d_model]."""
        dev = next(self.norm.parameters()).device
        dtype = next(self.norm.parameters()).dtype
        with torch.no_grad():
            return self.norm(x.to(dev, dtype)).float().cpu()

    def scale(self, r: torch.Tensor) -> torch.Tensor:
        """The norm's divisor for residual r [..., d]: its RMS (or std), eps included."""
        if self.layernorm:
            return (r.var(-1, unbiased=False, keepdim=True) + self.eps).sqrt()
        return (r.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def frozen(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The final norm as a linear map with its scale frozen at residual r (no bias)."""
        if self.layernorm:
            x = x - x.mean(-1, keepdim=True)
        return x * self.weight / self.scale(r)

    def project(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x [n, d] (already normed) dotted with the unembedding rows of ``tokens`` [k]: [n, k]."""
        return x @ self.w_u[tokens].T

    def logits(self, normed: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of ``tokens`` [k] from normed residuals [n, d], unembedding bias included."""
        out = self.project(normed, tokens)
        return out + self.b_u[tokens] if self.b_u is not None else out


@dataclass
class _Runs:
    z_conflict: torch.Tensor  # [n, L, H, e] at the final position
    z_clean: torch.Tensor  # [n, L, H, e]
    resid: torch.Tensor  # [n, d] final residual (before the final norm) at the final position
    logits: torch.Tensor  # [n, 2] conflict-run logits of (memory, context)


def _final_z(model: LoadedModel, prompts: Sequence[str], batch_size: int, resid: bool) -> tuple[torch.Tensor, ...]:
    info = model.info
    last_layer = info.n_layers - 1
    n = len(prompts)
    z = torch.empty(n, info.n_layers, info.n_heads, info.d_head)
    r = torch.empty(n, info.d_model)
    logits = torch.empty(n, info.vocab_size)
    cache = ["z.*", f"resid_post.{last_layer}"] if resid else ["z.*"]
    for idx, ids in grouped_by_length(model, prompts, batch_size):
        with torch.no_grad():
            out = model.run(ids, cache=cache)
        z[idx] = torch.stack([out.cache[f"z.{layer}"][:, -1].float().cpu() for layer in range(info.n_layers)], 1)
        if resid:
            r[idx] = out.cache[f"resid_post.{last_layer}"][:, -1].float().cpu()
            logits[idx] = out.logits[:, -1].float().cpu()
    return z, r, logits


def _runs(model: LoadedModel, items: Sequence[ConflictItem], fmt: str, batch_size: int) -> _Runs:
    check_format(fmt)
    conflict = [i.conflict_prompt(fmt) for i in items]
    plain = [i.plain_prompt(fmt) for i in items]
    for c, p in zip(conflict, plain, strict=True):
        if model.to_tokens(c)[0, -1] != model.to_tokens(p)[0, -1]:
            raise UserError(f"conflict and no-conflict prompts end in different tokens: {c!r} / {p!r}")
    z_c, resid, logits = _final_z(model, conflict, batch_size, resid=True)
    z_p, _, _ = _final_z(model, plain, batch_size, resid=False)
    toks = torch.tensor([[i.memory_token, i.context_token] for i in items])
    return _Runs(z_c, z_p, resid, logits.gather(1, toks))


def check_readout(model: LoadedModel, readout: FinalReadout, runs: _Runs, items: Sequence[ConflictItem]) -> float:
    """Max |logit| error of reading the cached final residual through norm + unembedding."""
    toks = torch.tensor([[i.memory_token, i.context_token] for i in items])
    normed = readout.normed(runs.resid)
    rebuilt = torch.stack([readout.logits(normed[n : n + 1], toks[n])[0] for n in range(len(items))])
    err = float((rebuilt - runs.logits).abs().max())
    # The frozen-scale map must reproduce the norm on the residual it was frozen at.
    frozen = readout.frozen(runs.resid, runs.resid) + (readout.bias if readout.bias is not None else 0.0)
    err_norm = float((frozen - normed).abs().max() / max(1.0, float(normed.abs().max())))
    if err_norm > 1e-4:
        raise UserError(
            f"{model.name}: final norm {type(readout.norm).__name__} is not a plain RMSNorm/LayerNorm "
            f"(frozen-scale error {err_norm:.3g}); direct-path patching does not support it"
        )
    tol = 1e-3 * max(1.0, float(runs.logits.abs().max()))
    if err > tol:
        raise UserError(
            f"{model.name}: the final residual read through its norm and unembedding does not give the "
            f"model's logits (max error {err:.3g}); direct-path patching does not support this architecture"
        )
    return err


def head_effects(
    model: LoadedModel, items: Sequence[ConflictItem], fmt: str, batch_size: int = 16
) -> pd.DataFrame:
    """Per item and head: path-patching deltas (both norm variants, both logits) and the direct
    logit attribution of the conflict-run output. One row per (item, layer, head)."""
    if not items:
        raise UserError("no conflict items for head attribution")
    info = model.info
    runs = _runs(model, items, fmt, batch_size)
    readout = FinalReadout(model)
    check_readout(model, readout, runs, items)
    w_o = output_weights(model)
    post = None if model.layout.attn_out_direct else AttnPostNorm(model)
    frames = []
    layer_idx = torch.arange(info.n_layers).repeat_interleave(info.n_heads)
    head_idx = torch.arange(info.n_heads).repeat(info.n_layers)
    for n, item in enumerate(items):
        toks = torch.tensor([item.memory_token, item.context_token])
        r = runs.resid[n]
        out_c = torch.einsum("lhe,lhed->lhd", runs.z_conflict[n], w_o)
        delta = torch.einsum("lhe,lhed->lhd", runs.z_clean[n] - runs.z_conflict[n], w_o)
        if post is not None and n == 0:
            post.check(model, out_c.sum(1) + post.o_bias)
        exact, lin, share = (x.reshape(-1, info.d_model) for x in _through_post_norm(post, out_c, delta))
        base = readout.logits(readout.normed(r[None]), toks)[0]
        patched = readout.logits(readout.normed(r[None] + exact), toks) - base  # [LH, 2]
        linear = readout.project(readout.frozen(lin, r[None]), toks)
        dla = readout.project(readout.frozen(share, r[None]), toks)
        frames.append(
            pd.DataFrame(
                {
                    "item": item.id,
                    "layer": layer_idx.numpy(),
                    "head": head_idx.numpy(),
                    "path_delta": (patched[:, 0] - patched[:, 1]).numpy(),
                    "path_delta_memory_logit": patched[:, 0].numpy(),
                    "path_delta_context_logit": patched[:, 1].numpy(),
                    "path_delta_frozen_norm": (linear[:, 0] - linear[:, 1]).numpy(),
                    "dla_memory": dla[:, 0].numpy(),
                    "dla_context": dla[:, 1].numpy(),
                    "dla_diff": (dla[:, 0] - dla[:, 1]).numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def total_effects(
    model: LoadedModel,
    items: Sequence[ConflictItem],
    fmt: str,
    rows_per_pass: int = 30,
    heads: Sequence[tuple[int, int]] | None = None,
) -> pd.DataFrame:
    """Per item and head: metric change when z of the head at the final position is patched from
    the no-conflict run with everything downstream recomputed (one batch row per head).
    ``heads`` restricts it to some heads (to confirm top candidates); default all."""
    if not items:
        raise UserError("no conflict items for total-effect patching")
    if rows_per_pass < 1:
        raise UserError("rows_per_pass must be >= 1")
    if heads is None:
        heads = all_heads(model)
    for layer, h in heads:
        model.check_head(layer, h)
    heads = list(heads)
    frames = []
    for item in items:
        ids = model.to_tokens(item.conflict_prompt(fmt))
        plain = model.to_tokens(item.plain_prompt(fmt))
        last = int(ids.shape[1]) - 1
        toks = [item.memory_token, item.context_token]
        with torch.no_grad():
            conf = model.run(ids, cache=["z.*"])
            clean = model.run(plain, cache=["z.*"])
        base = conf.logits[0, -1, toks].float().cpu()
        # The source is the conflict run's z with the final position taken from the no-conflict
        # run, so a Patch restricted to that position and head copies exactly the sender.
        mixed: dict[str, torch.Tensor] = {}
        for layer in range(model.info.n_layers):
            z = conf.cache[f"z.{layer}"].clone()
            z[:, -1] = clean.cache[f"z.{layer}"][:, -1]
            mixed[f"z.{layer}"] = z
        deltas = torch.empty(len(heads), 2)
        for s in range(0, len(heads), rows_per_pass):
            chunk = heads[s : s + rows_per_pass]
            ivs: list[Intervention] = [
                Patch(f"z.{layer}", source="noconflict", heads=(h,), positions=(last,), batch=(row,))
                for row, (layer, h) in enumerate(chunk)
            ]
            with torch.no_grad():
                out = model.run(ids.expand(len(chunk), -1), interventions=ivs, sources={"noconflict": mixed})
            deltas[s : s + len(chunk)] = out.logits[:, -1, toks].float().cpu() - base
        frames.append(
            pd.DataFrame(
                {
                    "item": item.id,
                    "layer": [layer for layer, _ in heads],
                    "head": [h for _, h in heads],
                    "total_delta": (deltas[:, 0] - deltas[:, 1]).numpy(),
                    "total_delta_memory_logit": deltas[:, 0].numpy(),
                    "total_delta_context_logit": deltas[:, 1].numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
