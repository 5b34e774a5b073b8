"""Memory heads and context heads under knowledge conflicts (Jin et al. 2024; path patching as in Wang et al. 2022).

Metric: logit(memory) - logit(context) at the last position of the conflict prompt.

Path patching of a head to the logits (the detector's ranking). For each query head (l, h):
its output at the final position is taken from the no-conflict run (the same query without the
counterfactual sentence, aligned at the final position) and sent into the conflict run along its
DIRECT path only: every other head, every MLP and every later layer stays frozen at its
conflict-run value. The receiver is the final residual stream at the last position, so the
patched final residual is exactly

    r' = r_conflict + (z_noconflict[l, h] - z_conflict[l, h]) @ W_O[l, h]

(the output bias cancels), and the logits are read through the final norm and the unembedding.
Only the final position matters: a head's output at another position has no direct path to the
last position's logits. Two variants of the final norm:

- ``recomputed`` (default, as Wang et al.'s path patching, where the receiver input is patched and
  everything after it is recomputed): logits' = unembed(norm(r')).
- ``frozen``: the norm's scale (RMS, or LayerNorm's std) stays at the conflict run's value, so the
  effect is linear: the direct logit attribution of the head's output difference.

Sign: ``path_delta`` = metric(patched) - metric(conflict). A head whose conflict-run output pushes
towards the memory answer more than its no-conflict output has ``path_delta`` < 0 (patching it
away lowers the metric): a memory head. ``path_delta`` > 0: the head's conflict-specific output
pushes towards the context answer: a context head. The ranking score is
``memory_score = -path_delta`` (pooled over formats); context heads are those with the most
negative memory score.

Also per head (not only the difference, since a head can push both answers): the effect on
logit(memory) and on logit(context) separately, and the direct logit attribution of its
conflict-run output (frozen norm) to each answer.

Total-effect patching (option): the same activation (z of head (l, h) at the final position) is
patched from the no-conflict run with everything downstream recomputed, one batch row per head;
its ranking is compared with path patching by Spearman correlation and top-k overlap.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from scipy.stats import spearmanr

from circuits.conflicts import (
    ConflictConfig,
    ConflictDataset,
    ConflictItem,
    check_format,
    conflict_dataset,
    example_tokens,
    grouped_by_length,
    rates,
    score_items,
)
from circuits.facts import facts_hash
from circuits.heads import all_heads, head_label
from interp import tables
from interp.config import param
from interp.errors import UserError
from interp.interventions import Intervention, Patch
from interp.layout import tensor_of
from interp.model import LoadedModel
from interp.registry import Detector, Summary, UnitResult, register

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


def rank_agreement(a: pd.Series, b: pd.Series, top: int = 10) -> dict[str, float]:
    """Spearman correlation of two per-head scores, and the overlap of their top-k heads at
    both ends (memory end: most negative delta; context end: most positive)."""
    a, b = a.align(b, join="inner")
    if len(a) < 2:
        raise UserError("rank agreement needs at least two heads")
    rho = float(spearmanr(a.to_numpy(), b.to_numpy()).statistic)  # type: ignore[attr-defined]
    k = min(top, len(a))
    mem = len(set(a.nsmallest(k).index) & set(b.nsmallest(k).index)) / k
    ctx = len(set(a.nlargest(k).index) & set(b.nlargest(k).index)) / k
    return {"spearman": rho, f"top{k}_overlap_memory": mem, f"top{k}_overlap_context": ctx}


def ranked_heads(scores: pd.DataFrame, column: str = "path_delta") -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(memory heads, context heads) from per-head mean deltas: memory heads have negative
    delta (most negative first), context heads positive (largest first)."""
    rows = sorted(
        zip(scores[column].astype(float).tolist(), scores["layer"].astype(int).tolist(),
            scores["head"].astype(int).tolist(), strict=True)
    )
    mem = [(layer, h) for v, layer, h in rows if v < 0]
    ctx = [(layer, h) for v, layer, h in reversed(rows) if v > 0]
    return mem, ctx


def _wide(long: pd.DataFrame) -> pd.DataFrame:
    """score_name/layer/head/value rows -> one row per head, one column per score."""
    return pd.DataFrame(
        long.pivot_table(index=["layer", "head"], columns="score_name", values="value").reset_index()
    )


def _col(frame: pd.DataFrame, name: str) -> pd.Series:
    return pd.Series(frame[name])


def mean_by_head(per_item: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in per_item.columns if c not in ("item", "layer", "head")]
    return pd.DataFrame(per_item.groupby(["layer", "head"], as_index=False)[cols].mean())


def head_map_figure(scores: pd.DataFrame, column: str, title: str) -> go.Figure:
    """Layer x head heatmap of one per-head score (diverging, centred at zero)."""
    grid = scores.pivot_table(index="layer", columns="head", values=column).sort_index()
    lim = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=[str(c) for c in grid.columns],
            y=[str(i) for i in grid.index],
            colorscale="RdBu",
            zmin=-lim,
            zmax=lim,
            colorbar={"title": column},
        )
    )
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", height=600)
    return fig


def rates_figure(table: pd.DataFrame, title: str = "memory vs context rates") -> go.Figure:
    """Grouped bars of memory / context / other rate per row label (format, split, condition)."""
    label = table["label"] if "label" in table else table["format"] + " / " + table["split"]
    fig = go.Figure()
    for col, name in (("memory_rate", "memory"), ("context_rate", "context"), ("other_rate", "neither")):
        fig.add_bar(x=label, y=table[col], name=name)
    fig.update_layout(barmode="group", title=title, xaxis_title="condition" if "label" in table else "prompt format / split",
                      yaxis_title="rate (fraction of items, top-1)", yaxis_range=[0, 1])
    return fig


# ---------------------------------------------------------------- the detector


@dataclass(frozen=True)
class ConflictHeadsConfig(ConflictConfig):
    """Parameters of conflict-heads: the conflict dataset (ConflictConfig), then the patching."""

    norm: Literal["recomputed", "frozen"] = param("recomputed", "final norm in path patching: recomputed or frozen")
    total_effect: bool = param(False, "also run total-effect patching (downstream recomputed)")
    total_items: int = param(4, "validation items per format for total-effect patching", low=1)
    # Not "top": `interp run --top` is the CLI's own option (rows of the printed table).
    n_top: int = param(10, "heads per kind listed in the metrics and used for top-k overlap", low=1)
    batch_size: int = param(16, "prompts per forward pass", low=1)


def _rank_column(cfg: ConflictHeadsConfig) -> str:
    return "path_delta" if cfg.norm == "recomputed" else "path_delta_frozen_norm"


def prefixed_head_scores(scores: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Per-head scores (one column per score) as ``head_scores`` rows, metric "<prefix>.<score>"."""
    long = pd.DataFrame(scores.melt(id_vars=["layer", "head"], var_name="metric", value_name="value"))
    metric = prefix + "." + long["metric"].astype(str)
    return tables.head_scores(zip(metric, long["layer"], long["head"], long["value"], strict=True))


def _pooled(hs: pd.DataFrame, n_items: Mapping[str, float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the units' head scores split into format and score name, the scores pooled over formats
    weighted by each format's number of patched items: score_name/layer/head/value rows)."""
    hs = hs.copy()
    parts = hs["metric"].astype(str).str.split(".", n=1)
    hs["format"] = parts.str[0]
    hs["score_name"] = parts.str[1]
    hs["w"] = [n_items[f] for f in hs["format"].tolist()]
    hs["wv"] = hs["value"] * hs["w"]
    pooled = pd.DataFrame(hs.groupby(["score_name", "layer", "head"], as_index=False)[["wv", "w"]].sum())
    pooled["value"] = pooled["wv"] / pooled["w"]
    return hs, pooled


def _ranking(pooled: pd.DataFrame, rank_col: str) -> pd.DataFrame:
    """One row per head with every pooled score and ``memory_score`` = -rank_col, best first."""
    wide = _wide(pooled)
    wide["memory_score"] = -wide[rank_col]
    return wide.sort_values("memory_score", ascending=False).reset_index(drop=True)


def _top_head_metrics(wide: pd.DataFrame, rank_col: str, n_top: int, n_layers: int) -> dict[str, Any]:
    """The top memory and context heads and their mean layer (Jin et al. 2024 find both late)."""
    mem_heads, ctx_heads = ranked_heads(wide, rank_col)
    out: dict[str, Any] = {
        "top_memory_heads": ",".join(head_label(*h) for h in mem_heads[:n_top]),
        "top_context_heads": ",".join(head_label(*h) for h in ctx_heads[:n_top]),
    }
    for kind, heads in (("memory", mem_heads[:n_top]), ("context", ctx_heads[:n_top])):
        if heads:
            out[f"mean_layer_top_{kind}_heads"] = float(np.mean([layer for layer, _ in heads]))
    out["n_layers"] = n_layers
    return out


def _agreement_metrics(
    hs: pd.DataFrame, wide: pd.DataFrame, rank_col: str, cfg: ConflictHeadsConfig
) -> dict[str, Any]:
    """Rank agreement of path patching with total-effect patching (pooled and per format, when
    run) and of the recomputed with the frozen final norm."""
    out: dict[str, Any] = {}
    idx = wide.set_index(["layer", "head"])
    if cfg.total_effect:
        for k, v in rank_agreement(_col(idx, rank_col), _col(idx, "total_delta"), cfg.n_top).items():
            out[f"path_vs_total.{k}"] = v
        for f in cfg.formats:
            sub = _wide(pd.DataFrame(hs.loc[hs["format"] == f])).set_index(["layer", "head"])
            for k, v in rank_agreement(_col(sub, rank_col), _col(sub, "total_delta"), cfg.n_top).items():
                out[f"{f}.path_vs_total.{k}"] = v
    # The frozen and recomputed final norm differ only by the norm's response to the patch;
    # their agreement shows how far the linear (DLA-like) reading can be trusted.
    out["norm_recomputed_vs_frozen.spearman"] = rank_agreement(
        _col(idx, "path_delta"), _col(idx, "path_delta_frozen_norm"), cfg.n_top
    )["spearman"]
    return out


def _dataset_metrics(ds: ConflictDataset, seed: int, split: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The split's sizes and hash, and a warning for items scored on first tokens only."""
    n_unequal = sum(not i.equal_token_count for i in ds.validation + ds.test)
    metrics = {
        "seed": seed,
        "split_hash": split["hash"],
        "n_validation": len(ds.validation),
        "n_test": len(ds.test),
        "n_facts": ds.n_facts,
        "n_known_facts": ds.n_known,
        "n_unequal_token_count": n_unequal,
    }
    warnings = []
    if n_unequal:
        warnings.append(
            f"{n_unequal} items have answers of different token counts; "
            "they are scored on the first token of each answer"
        )
    return metrics, warnings


def _head_rows(wide: pd.DataFrame) -> list[dict[str, Any]]:
    """The summary's heads, best memory head first, with every pooled score."""
    score_cols = [str(c) for c in wide.columns if c not in ("layer", "head", "memory_score")]
    return [
        {
            "layer": int(r["layer"]),
            "head": int(r["head"]),
            "score": float(r["memory_score"]),
            "kind": "memory" if float(r["memory_score"]) > 0 else "context",
            **{c: float(r[c]) for c in score_cols},
        }
        for r in wide.to_dict("records")
    ]


def _final_head_scores(hs: pd.DataFrame, pooled: pd.DataFrame, wide: pd.DataFrame) -> pd.DataFrame:
    """Per-format scores as the units wrote them, then "pooled.<score>" and pooled.memory_score."""

    def rows(metric: Any, frame: pd.DataFrame) -> Iterator[tuple[Any, ...]]:
        return zip(metric, frame["layer"], frame["head"], frame["value"], strict=True)

    mem = wide.assign(value=wide["memory_score"])
    return tables.head_scores(
        chain(
            rows(hs["metric"], hs),
            rows("pooled." + pooled["score_name"], pooled),
            rows(["pooled.memory_score"] * len(mem), mem),
        )
    )


@register
class ConflictHeadsDetector(Detector[ConflictHeadsConfig]):
    name = "conflict-heads"
    description = (
        "Memory heads vs context heads under knowledge conflicts: path patching of each head to the "
        "logits (Jin et al. 2024), per-answer direct effects, optional total-effect patching"
    )
    output = "head_scores"
    head_columns: ClassVar[dict[str, str]] = {"kind": "kind", "path_delta": "path", "dla_diff": "dla", "total_delta": "total",
                    "path_delta_memory_logit": "mem logit", "path_delta_context_logit": "ctx logit"}
    # The default scan patches a seeded subset of 16 known items (8 validation, 8 test) instead of
    # 80, so the Conflicts page has memory/context rates and head maps after the first scan.
    in_default_scan = True
    scan_params: ClassVar[dict[str, Any]] = {"max_items": 16}
    Config = ConflictHeadsConfig

    def variant(self, cfg: ConflictHeadsConfig) -> str:
        v = f"direct-path.{cfg.norm}-norm"
        return v + "+total-effect" if cfg.total_effect else v

    def method_text(self, cfg: ConflictHeadsConfig) -> str:
        norm = ("recomputed on the patched residual" if cfg.norm == "recomputed"
                else "with its scale frozen at the conflict run's value (linear, DLA-like)")
        text = (
            "Path patching (Wang et al. 2022) of each head's output at the final position from the "
            "no-conflict run into the conflict run along its direct path to the logits only, final "
            f"norm {norm}; memory vs context heads ranked on the validation split (Jin et al. 2024)."
        )
        if cfg.total_effect:
            text += (" Also total-effect patching of the same activation (final position) with "
                     "everything downstream recomputed.")
        return text

    def dataset(self, model: LoadedModel, cfg: ConflictHeadsConfig) -> ConflictDataset:
        return self.memo("dataset", model, cfg, lambda: conflict_dataset(model, cfg, cfg.batch_size))

    def dataset_hash(self, model: LoadedModel, cfg: ConflictHeadsConfig) -> str | None:
        return facts_hash(cfg.facts)

    def example_tokens(self, model: LoadedModel, cfg: ConflictHeadsConfig) -> torch.Tensor | None:
        return example_tokens(model, cfg)

    def units(self, model: LoadedModel, cfg: ConflictHeadsConfig) -> list[str]:
        return list(cfg.formats)

    def run_unit(self, model: LoadedModel, cfg: ConflictHeadsConfig, unit: str) -> UnitResult:
        return self.join_parts(model, cfg, unit, [self.run_part(model, cfg, unit, "items-0-of-1")])

    # A format's unit splits by validation items: each part path-patches its share of the items;
    # the first also scores the answer rates and the total effects. The driver averages them.
    def split_unit(self, model: LoadedModel, cfg: ConflictHeadsConfig, unit: str, n: int) -> list[str]:
        n = min(n, len(self.dataset(model, cfg).split("validation")))
        return [] if n < 2 else [f"items-{i}-of-{n}" for i in range(n)]

    def run_part(self, model: LoadedModel, cfg: ConflictHeadsConfig, unit: str, part: str) -> dict[str, Any]:
        fmt, (_, i, _, n) = unit, part.split("-")
        ds = self.dataset(model, cfg)
        val = ds.split("validation")
        share = np.array_split(np.arange(len(val)), int(n))[int(i)]
        out: dict[str, Any] = {"effects": head_effects(model, [val[j] for j in share], fmt, cfg.batch_size)}
        if int(i) == 0:
            metrics: list[tuple[str, float, float | None, float | None, int | None]] = []
            for split in ("validation", "test"):
                r = rates(score_items(model, ds.split(split), fmt, batch_size=cfg.batch_size))
                count = int(r.pop("n"))
                metrics += [(f"{fmt}.{split}.{k}", float(v), None, None, count) for k, v in r.items()]
            out["metrics"] = metrics
            if cfg.total_effect:
                out["total"] = total_effects(model, val[: cfg.total_items], fmt)
        return out

    def join_parts(self, model: LoadedModel, cfg: ConflictHeadsConfig, unit: str, parts: Sequence[Any]) -> UnitResult:
        fmt, first = unit, parts[0]
        n_val = len(self.dataset(model, cfg).split("validation"))
        effects = pd.concat([p["effects"] for p in parts], ignore_index=True)
        per_item = effects.groupby("item").size()
        n_heads = model.info.n_layers * model.info.n_heads
        if len(per_item) != n_val or bool((per_item != n_heads).any()):
            raise ValueError(f"the parts of {fmt} cover {len(per_item)} of its {n_val} validation items, "
                             "some twice or none")
        scores = mean_by_head(effects)
        metrics = list(first["metrics"])
        if cfg.total_effect:
            scores = scores.merge(mean_by_head(first["total"]), on=["layer", "head"])
            metrics.append((f"{fmt}.n_total_effect_items", float(min(n_val, cfg.total_items)), None, None, None))
        metrics.append((f"{fmt}.n_patch_items", float(n_val), None, None, n_val))
        return UnitResult(
            tables={"head_scores": prefixed_head_scores(scores, fmt), "metrics": tables.metric_rows(metrics)}
        )

    def finalize(
        self, model: LoadedModel, cfg: ConflictHeadsConfig, results: Mapping[str, pd.DataFrame]
    ) -> Summary:
        met = results["metrics"]
        metrics: dict[str, Any] = dict(
            zip(met["name"].astype(str).tolist(), met["value"].astype(float).tolist(), strict=True)
        )
        hs, pooled = _pooled(results["head_scores"], {f: metrics[f"{f}.n_patch_items"] for f in cfg.formats})
        rank_col = _rank_column(cfg)
        wide = _ranking(pooled, rank_col)
        metrics.update(_top_head_metrics(wide, rank_col, cfg.n_top, model.info.n_layers))
        metrics.update(_agreement_metrics(hs, wide, rank_col, cfg))
        ds = self.dataset(model, cfg)
        split = ds.split_record()
        split_metrics, warnings = _dataset_metrics(ds, cfg.seed, split)
        metrics.update(split_metrics)
        return Summary(
            detector=self.name,
            variant=self.variant(cfg),
            heads=_head_rows(wide),
            metrics=metrics,
            warnings=warnings,
            tables={
                "head_scores": _final_head_scores(hs, pooled, wide),
                "metrics": tables.metrics(metrics),
                "artifacts": self._artifacts(cfg, ds, split),
            },
        )

    def _artifacts(self, cfg: ConflictHeadsConfig, ds: ConflictDataset, split: Mapping[str, Any]) -> pd.DataFrame:
        """The split, what was patched and how (the run's settings artifact holds the
        parameters), and every item with its split."""
        patching = {
            "variant": self.variant(cfg),
            "frozen": FROZEN,
            "final_norm": cfg.norm,
            "metric": "logit(memory) - logit(context) at the final position, first answer tokens",
            "sign": "path_delta = metric(patched) - metric(conflict); memory_score = -path_delta",
            "ranking_split": "validation",
            "formats": list(cfg.formats),
        }
        items = ([dict(i.to_dict(), split="validation") for i in ds.validation]
                 + [dict(i.to_dict(), split="test") for i in ds.test])
        return pd.concat(
            [tables.artifact("split", split), tables.artifact("patching", patching), tables.artifact("items", items)],
            ignore_index=True,
        )
