"""Episodic memory in attention: copying scores, attention lag-CRPs, CMR fits and ablations.

Olsson et al. 2022 (copying), Ji-An et al. 2024 and Mistry et al. 2025 (lag-CRP, CMR),
McGrath et al. 2023 (single and cumulative ablation):

- ``copying``: the copying score of every head, sum(lambda) / sum(|lambda|) over the eigenvalues
  of its token-to-token OV map W_E W_V W_O W_U (Olsson et al. 2022), next to its prefix-matching
  (induction) score on repeated random tokens; a head is an induction head only with both.
- ``lag-crp``: each head's attention lag-CRP on repeated token lists (Ji-An et al. 2024): from
  each second-copy token to the first-copy positions p + lag around its first occurrence p;
  the ``mistry`` variant (Mistry et al. 2025) shows frequent tokens once and repeats them in a
  random order. The serial-position curve gives primacy and recency.
- ``cmr``: the lag-CRP of every head fitted by the CMR model (``circuits/cmr_model.py``):
  distance, fitted parameters, CMR-like labels (distance < 0.5; strict < 0.1).
- ``episodic-ablation``: zero (or mean) ablation of the top-k heads by a score against k random
  heads drawn outside the top set, several draws: in-context-learning score on natural text and
  second-copy loss on repeated tokens, single-head and cumulative effects, paired t-test.

The copying score reads the weights from ``model.hf``. Included: the RMSNorm/LayerNorm weight of
the layer's attention input folded into W_V, and the final-norm weight folded into W_U (the
unembedding, which for SmolLM2 is tied to W_E). Left out: the per-token normalisation scale, norm
biases and centring (for LayerNorm models), and the value/output biases. The eigenvalues are those
of the d_head x d_head matrix (W_V g_l) (E^T U) (g_f W_O), whose non-zero spectrum equals that of
the vocab x vocab map; E^T U is d_model x d_model and computed once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self, TypeVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float

from circuits import cmr_model
from circuits.heads import head_label, random_heads
from circuits.induction import INDUCTION_THRESHOLD, copy_losses, head_scores_from_patterns
from interp import tables
from interp.config import SEED_MAX, DetectorConfig, param
from interp.engine import activation_bytes, units_within
from interp.errors import UserError
from interp.interventions import Intervention, ablate_heads
from interp.layout import tensor_of, unwrap
from interp.model import LoadedModel
from interp.registry import Detector, Summary, UnitResult, register
from interp.tokens import repeated_random_tokens

if TYPE_CHECKING:
    import plotly.graph_objects as go

DATA_DIR = Path(__file__).resolve().parent / "data"
TEXT_SAMPLE = DATA_DIR / "public_domain_sample.txt"


# --------------------------------------------------------------------------------------------
# OV circuits and copying scores
# --------------------------------------------------------------------------------------------


def _unwrap(module: Any) -> Any:
    """The HF module behind a TransformerBridge wrapper (:func:`interp.layout.unwrap`)."""
    return unwrap(module)


def _weight(module: Any) -> torch.Tensor:
    return tensor_of(_unwrap(module))


@dataclass
class OVWeights:
    """Per query head: W_V [layers, heads, d_head, d_model] (input-norm weight folded in) and
    W_O [layers, heads, d_model, d_head]; W_E [vocab, d_model]; W_U [vocab, d_model] (final-norm
    weight folded in). Column convention: v = W_V x, out = W_O z, logits = W_U out."""

    w_v: torch.Tensor
    w_o: torch.Tensor
    w_e: torch.Tensor
    w_u: torch.Tensor


def ov_weights(model: LoadedModel) -> OVWeights:
    """Read the OV weights of every query head from ``model.hf``, each with its kv group's W_V."""
    hf = model.hf
    info = model.info
    layout = model.layout  # where v/o, the norms and the (un)embedding live; UserError if unknown
    dh, d, nh, group = info.d_head, info.d_model, info.n_heads, info.group_size
    w_vs, w_os = [], []
    for layer in range(info.n_layers):
        # The norms' elementwise factors (w, or Gemma's 1 + w); their per-token 1/rms is a
        # positive scale of the whole map and leaves sum(lambda) / sum(|lambda|) unchanged.
        gamma = layout.norm_scale(hf, "attn_norm", layer)
        # [out, in] weights: W_V [n_kv*dh, d] (a slice of a fused qkv), W_O [d, n_heads*dh].
        kv = layout.value_weight(hf, layer, info).reshape(info.n_kv_heads, dh, d) * gamma
        # On one device: a device map spreads the layers (query head h uses kv head h // group).
        w_vs.append(kv.repeat_interleave(group, dim=0).to(model.device))
        w_o = layout.weight(hf, "o", layer)
        if not layout.attn_out_direct:  # a post-attention norm scales the output before the residual
            w_o = layout.norm_scale(hf, "attn_post_norm", layer)[:, None] * w_o
        w_os.append(w_o.reshape(d, nh, dh).permute(1, 0, 2).to(model.device))
    w_e = layout.embedding(hf).to(model.device)
    final = layout.norm_scale(hf, "final_norm")
    w_u = (_weight(layout.module(hf, "unembed")).to(final.device) * final).to(model.device)
    return OVWeights(w_v=torch.stack(w_vs), w_o=torch.stack(w_os), w_e=w_e, w_u=w_u)


def ov_eigenvalues(w: OVWeights) -> torch.Tensor:
    """Eigenvalues [layers, heads, d_head] (complex) of each head's low-rank OV token map."""
    emb_unemb = w.w_e.double().T @ w.w_u.double()  # E^T U: [d_model, d_model]
    small = w.w_v.double() @ emb_unemb @ w.w_o.double()  # [L, H, dh, dh]
    return torch.linalg.eigvals(small)


def copying_scores(model: LoadedModel) -> Float[torch.Tensor, "layer head"]:
    """sum(lambda) / sum(|lambda|) of each head's OV circuit, in [-1, 1]; positive = copying."""
    eig = ov_eigenvalues(ov_weights(model))
    return (eig.sum(-1).real / eig.abs().sum(-1)).float()


# --------------------------------------------------------------------------------------------
# Attention lag-CRP
# --------------------------------------------------------------------------------------------


@dataclass
class ListPrompts:
    """Token lists presented twice: ``tokens`` [b, seq]; the first list starts at ``offset``
    and has length R; second-list query k sits at ``offset + R + k`` and shows the token of
    first-list position ``match[b, k]``."""

    tokens: torch.Tensor
    offset: int
    length: int
    match: torch.Tensor


def repeated_lists(model: LoadedModel, batch: int, length: int, seed: int) -> ListPrompts:
    tokens = repeated_random_tokens(model, batch, length, seed)
    return ListPrompts(tokens, len(model.prefix), length, torch.arange(length).expand(batch, length).clone())


def frequent_tokens(model: LoadedModel, n: int) -> tuple[list[int], int]:
    """The n most frequent tokens of the bundled English text (ties by id), special tokens
    excluded; filled from the lowest ordinary ids when the text has fewer. Returns the ids and
    how many came from the fill."""
    specials = {int(i) for i in getattr(model.tokenizer, "all_special_ids", []) if i is not None}
    ids = model.tokenizer(TEXT_SAMPLE.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    uniq, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
    ranked = sorted((-int(c), int(t)) for t, c in zip(uniq, counts, strict=True) if int(t) not in specials)
    chosen = [t for _, t in ranked[:n]]
    filled = 0
    tid = 0
    have = set(chosen)
    while len(chosen) < n and tid < model.info.vocab_size:
        if tid not in have and tid not in specials:
            chosen.append(tid)
            filled += 1
        tid += 1
    if len(chosen) < n:
        raise UserError(f"the vocabulary has fewer than {n} ordinary tokens")
    return chosen, filled


def mistry_lists(model: LoadedModel, batch: int, length: int, seed: int) -> ListPrompts:
    """Mistry et al. 2025: the ``length`` most frequent tokens in a random order, then again in
    another random order (after the prompt prefix, when the model has one)."""
    vocab, _ = frequent_tokens(model, length)
    pool = torch.tensor(vocab)
    gen = torch.Generator().manual_seed(seed)
    rows, matches = [], []
    for _ in range(batch):
        first = pool[torch.randperm(length, generator=gen)]
        order = torch.randperm(length, generator=gen)  # second-list k shows first-list order[k]
        rows.append(torch.cat([torch.tensor(model.prefix.ids, dtype=torch.long), first, first[order]]))
        matches.append(order)
    return ListPrompts(torch.stack(rows), len(model.prefix), length, torch.stack(matches))


def lag_crp_from_pattern(
    pattern: Float[torch.Tensor, "batch head q k"], prompts: ListPrompts, max_lag: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: summed attention by lag [heads, 2*max_lag+1] and the count of (query, lag)
    pairs with the key inside the first list [2*max_lag+1]."""
    off, r = prompts.offset, prompts.length
    lags = torch.arange(-max_lag, max_lag + 1, device=pattern.device)
    first_idx = prompts.match.to(pattern.device)[:, :, None] + lags  # [b, R, lags]
    valid = (first_idx >= 0) & (first_idx < r)
    keys = off + first_idx.clamp(0, r - 1)
    q = off + r + torch.arange(r)
    rows = pattern[:, :, q, :]  # [b, H, R, seq]
    att = rows.gather(3, keys[:, None].expand(-1, pattern.shape[1], -1, -1))  # [b, H, R, lags]
    att = att * valid[:, None]
    return att.sum(dim=(0, 2)).double(), valid.sum(dim=(0, 1)).double()


def serial_position_sum(pattern: Float[torch.Tensor, "batch head q k"], prompts: ListPrompts) -> torch.Tensor:
    """Per head, attention summed over second-list queries to each first-list position [H, R]."""
    off, r = prompts.offset, prompts.length
    return pattern[:, :, off + r : off + 2 * r, off : off + r].sum(dim=(0, 2)).double()


def primacy_recency(spc: np.ndarray, edge_frac: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Mean attention to the first / last ``edge_frac`` of serial positions over the mean to
    the middle half (> 1: primacy / recency)."""
    r = spc.shape[-1]
    edge = max(1, round(r * edge_frac))
    mid = spc[..., r // 4 : r - r // 4].mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return spc[..., :edge].mean(-1) / mid, spc[..., -edge:].mean(-1) / mid


def _layer_chunks(model: LoadedModel, batch: int, seq: int, budget_bytes: float = 4e8) -> list[list[int]]:
    """Layers whose attention patterns fit the memory budget together in one forward pass."""
    # One cached pattern per layer (heads x seq x seq per row), counted in float32 bytes.
    per_layer = batch * activation_bytes(model, seq, item=4, scores=1)
    step = units_within(budget_bytes, per_layer)
    layers = list(range(model.info.n_layers))
    return [layers[i : i + step] for i in range(0, len(layers), step)]


def lag_crp_unit(model: LoadedModel, prompts: ListPrompts, max_lag: int) -> dict[str, np.ndarray]:
    """Lag-CRP sums, counts and serial-position sums of every head for one batch of prompts."""
    b, seq = prompts.tokens.shape
    n_l, n_h = model.info.n_layers, model.info.n_heads
    sums = np.zeros((n_l, n_h, 2 * max_lag + 1))
    spc = np.zeros((n_l, n_h, prompts.length))
    counts = np.zeros(2 * max_lag + 1)
    for chunk in _layer_chunks(model, b, seq):
        with torch.no_grad():
            out = model.run(prompts.tokens, cache=[f"pattern.{layer}" for layer in chunk])
        for layer in chunk:
            pat = out.cache[f"pattern.{layer}"].float()
            s, c = lag_crp_from_pattern(pat, prompts, max_lag)
            sums[layer] = s.cpu().numpy()
            counts = c.cpu().numpy()
            spc[layer] = serial_position_sum(pat, prompts).cpu().numpy()
        del out
    return {"sums": sums, "counts": counts, "spc": spc}


def _weighted_curves(curves: pd.DataFrame, metrics: pd.DataFrame, name: str) -> pd.DataFrame:
    """Average one curve over units, weighting each unit by its number of queries."""
    m_units = _col(metrics, "unit")[_col(metrics, "name") == "n_queries"]
    weight = dict(zip(m_units, _col(metrics, "value")[_col(metrics, "name") == "n_queries"], strict=True))
    sel = _col(curves, "curve") == name
    w = np.array([weight[u] for u in _col(curves, "unit")[sel]], dtype=float)
    df = pd.DataFrame(
        {
            "layer": _col(curves, "layer")[sel].astype(int),
            "head": _col(curves, "head")[sel].astype(int),
            "x": _col(curves, "x")[sel].astype(float),
            "wy": _col(curves, "y")[sel].astype(float) * w,
            "w": w,
        }
    )
    agg = pd.DataFrame(df.groupby(["layer", "head", "x"], as_index=False).sum())
    y = _col(agg, "wy") / _col(agg, "w")
    return pd.DataFrame({"layer": _col(agg, "layer"), "head": _col(agg, "head"), "x": _col(agg, "x"), "y": y})


def curve_array(df: pd.DataFrame, n_layers: int, n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Long curve table (layer, head, x, y) -> [layers, heads, xs] and the xs."""
    x_all = _col(df, "x").astype(float)
    xs = np.unique(x_all)
    arr = np.full((n_layers, n_heads, len(xs)), np.nan)
    arr[_col(df, "layer").astype(int), _col(df, "head").astype(int), np.searchsorted(xs, x_all)] = _col(df, "y")
    return arr, xs


def _col(df: pd.DataFrame, name: str) -> np.ndarray:
    """A column as a numpy array (keeps the long-table code free of pandas' loose typing)."""
    return np.asarray(df[name].to_numpy())


def _curve_rows(name: str, arr: np.ndarray, xs: Sequence[float] | np.ndarray) -> list[tuple[str, int, int, float, float]]:
    n_l, n_h, _ = arr.shape
    return [
        (name, layer, head, float(x), float(arr[layer, head, i]))
        for layer in range(n_l)
        for head in range(n_h)
        for i, x in enumerate(xs)
    ]



# A list size of 0 means the lists' default: Mistry et al.'s lists of frequent tokens are
# long (a 1001-token prompt each), so those lists run fewer prompts, one per forward pass.
_LIST_DEFAULTS: dict[str, dict[str, int]] = {
    "repeated": {"seq_len": 50, "n_prompts": 20, "batch_size": 10},
    "mistry": {"seq_len": 500, "n_prompts": 2, "batch_size": 1},
}


@dataclass(frozen=True)
class LagListsConfig(DetectorConfig):
    """The lists shared by ``lag-crp`` and ``cmr`` (a size of 0: the lists' default, see
    :meth:`resolved`)."""

    # Called ``variant`` before 0.2, a word the run's method variant owns.
    renamed: ClassVar[dict[str, str]] = {"variant": "lists"}

    lists: Literal["repeated", "mistry"] = param(
        "repeated", "input lists: repeated random tokens, or Mistry et al.'s frequent tokens"
    )
    seq_len: int = param(0, "list length R (0: 50 for repeated, 500 for mistry)", low=0)
    n_prompts: int = param(0, "number of prompts (0: 20 for repeated, 2 for mistry)", low=0)
    batch_size: int = param(
        0, "prompts per forward pass, one stored unit each (0: 10 repeated, 1 mistry)", low=0
    )
    max_lag: int = param(8, "lags -max_lag..max_lag", low=1)
    seed: int = param(0, "random seed of the lists", low=0, high=SEED_MAX)

    def check(self) -> None:
        super().check()
        seq_len = self.seq_len or _LIST_DEFAULTS[self.lists]["seq_len"]
        if seq_len < self.max_lag + 2:
            default = "" if self.seq_len else f" (the {self.lists} default)"
            raise UserError(
                f"need seq_len >= max_lag + 2, got seq_len={seq_len}{default} and max_lag={self.max_lag}"
            )

    def resolved(self) -> Self:
        """This config with each size of 0 replaced by the lists' default."""
        sizes = {name: getattr(self, name) or value for name, value in _LIST_DEFAULTS[self.lists].items()}
        return dataclasses.replace(self, **sizes)


LagC = TypeVar("LagC", bound=LagListsConfig)


class _LagCRPBase(Detector[LagC]):
    output = "curves"
    curve_axes: ClassVar[dict[str, tuple[str, str]]] = {
        "lag_crp": ("lag: key - matching position in the first list (tokens)", "attention weight (mean over queries)"),
        "serial_position": ("serial position in the first list (tokens)", "attention weight (mean over queries)"),
    }

    def units(self, model: LoadedModel, cfg: LagC) -> list[str]:
        p = cfg.resolved()
        model.check_length(2 * p.seq_len + len(model.prefix))
        if p.lists == "mistry" and p.seq_len > model.info.vocab_size // 2:
            raise UserError(f"mistry lists of {p.seq_len} tokens need a larger vocabulary")
        n, b = p.n_prompts, p.batch_size
        return [f"batch-{i}" for i in range((n + b - 1) // b)]

    def prompts(self, model: LoadedModel, cfg: LagC, unit: str) -> ListPrompts:
        p = cfg.resolved()
        i = int(unit.split("-")[1])
        size = min(p.batch_size, p.n_prompts - i * p.batch_size)
        seed = p.seed * 100_003 + i
        if p.lists == "mistry":
            return mistry_lists(model, size, p.seq_len, seed)
        return repeated_lists(model, size, p.seq_len, seed)

    def example_tokens(self, model: LoadedModel, cfg: LagC) -> torch.Tensor:
        return self.prompts(model, cfg, "batch-0").tokens

    def run_unit(self, model: LoadedModel, cfg: LagC, unit: str) -> UnitResult:
        max_lag = cfg.max_lag
        prompts = self.prompts(model, cfg, unit)
        res = lag_crp_unit(model, prompts, max_lag)
        lags = np.arange(-max_lag, max_lag + 1)
        # Per-unit means; finalize re-weights by the number of queries (per-lag counts scale with it).
        crp = res["sums"] / np.maximum(res["counts"], 1)
        n_queries = prompts.tokens.shape[0] * prompts.length
        spc = res["spc"] / n_queries
        rows = _curve_rows("lag_crp", crp, lags) + _curve_rows("serial_position", spc, np.arange(prompts.length))
        return UnitResult(
            tables={
                "curves": tables.curves(rows),
                "metrics": tables.metrics({"n_queries": n_queries}, n=int(prompts.tokens.shape[0])),
            }
        )

    def aggregate(
        self, model: LoadedModel, results: Mapping[str, pd.DataFrame]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
        """(lag-CRP [L, H, lags], lags, serial-position curve [L, H, R], long curve table)."""
        curves, metrics = results["curves"], results["metrics"]
        crp_df = _weighted_curves(curves, metrics, "lag_crp")
        spc_df = _weighted_curves(curves, metrics, "serial_position")
        crp, lags = curve_array(crp_df, model.info.n_layers, model.info.n_heads)
        spc, _ = curve_array(spc_df, model.info.n_layers, model.info.n_heads)
        table = pd.concat([crp_df.assign(curve="lag_crp"), spc_df.assign(curve="serial_position")], ignore_index=True)
        return crp, lags, spc, table.reindex(columns=tables.columns("curves"))


def lag_records(crp: np.ndarray, lags: np.ndarray, spc: np.ndarray) -> list[dict[str, Any]]:
    """Per head: lag-CRP at +1, -1, 0, the peak lag, the +1/-1 asymmetry, primacy, recency."""
    n_l, n_h, _ = crp.shape
    li = {int(x): i for i, x in enumerate(lags)}
    primacy, recency = primacy_recency(spc)
    rows = []
    for layer in range(n_l):
        for head in range(n_h):
            c = crp[layer, head]
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "crp_plus1": float(c[li[1]]),
                    "crp_minus1": float(c[li[-1]]),
                    "crp_lag0": float(c[li[0]]),
                    "peak_lag": int(lags[int(np.argmax(c))]),
                    "asymmetry": float(c[li[1]] - c[li[-1]]),
                    "primacy": float(primacy[layer, head]),
                    "recency": float(recency[layer, head]),
                }
            )
    return rows



@dataclass(frozen=True)
class LagCRPConfig(LagListsConfig):
    """Parameters of ``lag-crp``: the shared lists, Mistry et al.'s by default."""

    lists: Literal["mistry", "repeated"] = param(
        "mistry", "input lists: Mistry et al.'s frequent tokens, or repeated random tokens"
    )


@register
class LagCRPDetector(_LagCRPBase[LagCRPConfig]):
    name = "lag-crp"
    description = "Attention lag-CRP of every head on repeated lists (Mistry et al. frequent tokens by default; --lists repeated for random tokens), with primacy and recency"
    # The repeated-random-token lag-CRP (with primacy and recency) comes with every ``cmr`` run,
    # which is in the default scan; this detector defaults to the Mistry et al. lists (two
    # 1001-token prompts, about 90 CPU-seconds on smollm2), too slow for a default scan.
    Config = LagCRPConfig
    head_columns: ClassVar[dict[str, str]] = {
        "crp_minus1": "crp-1", "asymmetry": "asym", "peak_lag": "peak lag", "recency": "recency", "primacy": "primacy"}

    def variant(self, cfg: LagCRPConfig) -> str:
        return cfg.lists

    def method_text(self, cfg: LagCRPConfig) -> str:
        lists = ("the most frequent tokens shown twice in two random orders (Mistry et al. 2025)"
                 if cfg.lists == "mistry" else "random token lists repeated twice")
        return (f"attention lag-CRP of every head (Ji-An et al. 2024) on {lists}: mean attention from each "
                "second-list token to the first-list positions around its first occurrence, by lag, with the "
                "serial-position curve's primacy and recency")

    def finalize(self, model: LoadedModel, cfg: LagCRPConfig, results: Mapping[str, pd.DataFrame]) -> Summary:
        crp, lags, spc, table = self.aggregate(model, results)
        records = sorted(lag_records(crp, lags, spc), key=lambda r: -r["crp_plus1"])
        heads = [_finite({**r, "score": r["crp_plus1"]}) for r in records]
        mean_crp = np.nanmean(crp, axis=(0, 1))
        m = results["metrics"]
        metrics = {
            "n_heads": len(heads),
            "n_prompts": int(_col(m, "n")[_col(m, "name") == "n_queries"].sum()),
            "n_heads_peak_plus1": sum(r["peak_lag"] == 1 for r in records),
            "n_heads_asymmetric_forward": sum(r["asymmetry"] > 0 for r in records),
            "mean_crp_by_lag": {int(x): float(y) for x, y in zip(lags, mean_crp, strict=True)},
            "median_primacy": float(np.nanmedian([r["primacy"] for r in records])),
            "median_recency": float(np.nanmedian([r["recency"] for r in records])),
        }
        head_rows = [
            (name, r["layer"], r["head"], float(r[name]))
            for r in records
            for name in ("crp_plus1", "crp_minus1", "asymmetry", "primacy", "recency")
        ]
        return Summary(
            detector=self.name,
            variant=self.variant(cfg),
            heads=heads,
            metrics=_finite(metrics),
            tables={"curves": table, "head_scores": tables.head_scores(head_rows), "metrics": tables.metrics(metrics)},
        )


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, recursively, so summaries are strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# CMR fit
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CMRConfig(LagListsConfig):
    """Parameters of ``cmr``: the shared lists (repeated random tokens by default) and the
    simulated CMR grid."""

    grid_sims: int = param(cmr_model.GridSpec().n_sims, "CMR trials per start position and grid point", low=1)
    grid_estimator: Literal["sampled", "expected"] = param(cmr_model.GridSpec().estimator, "CMR CRP estimator")
    grid_seed: int = param(0, "seed of the CMR simulation", low=0, high=SEED_MAX)
    fit_lag: int = param(
        cmr_model.FIT_LAG, "lags -fit_lag..fit_lag enter the CMR distance (at most max_lag)",
        low=1, high=cmr_model.GridSpec().max_lag,
    )

    def check(self) -> None:
        super().check()
        if self.fit_lag > self.max_lag:
            raise UserError(f"fit_lag must be <= max_lag ({self.max_lag}), got {self.fit_lag}")


def grid_spec(cfg: CMRConfig) -> cmr_model.GridSpec:
    return cmr_model.GridSpec(n_sims=cfg.grid_sims, estimator=cfg.grid_estimator, seed=cfg.grid_seed)


def cmr_records(
    crp: np.ndarray, lags: np.ndarray, grid: cmr_model.CMRGrid, fit_lag: int
) -> tuple[list[dict[str, Any]], cmr_model.CMRFit]:
    """Fit every head; one record per head (layer-major) with distance, parameters and labels."""
    n_l, n_h, _ = crp.shape
    fit = cmr_model.fit_cmr(crp.reshape(n_l * n_h, -1), lags, grid, fit_lag)
    labels = fit.labels()
    records = [
        {
            "layer": i // n_h,
            "head": i % n_h,
            "cmr_distance": float(fit.distance[i]),
            "beta_enc": float(fit.beta_enc[i]),
            "beta_rec": float(fit.beta_rec[i]),
            "gamma_ft": float(fit.gamma_ft[i]),
            "cmr_like": bool(labels["cmr_like"][i]),
            "cmr_like_strict": bool(labels["cmr_like_strict"][i]),
        }
        for i in range(n_l * n_h)
    ]
    return records, fit


def _by_layer(records: Sequence[Mapping[str, Any]], flag: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in records:
        if r[flag]:
            out[int(r["layer"])] = out.get(int(r["layer"]), 0) + 1
    return dict(sorted(out.items()))


def _fit_curve_rows(records: Sequence[Mapping[str, Any]], fit: cmr_model.CMRFit) -> list[tuple[str, int, int, float, float]]:
    """Each head's scaled CMR fit and shifted attention curve, as ``curves`` rows."""
    rows = []
    for idx, r in enumerate(records):
        for x, y in zip(fit.lags, fit.fitted[idx], strict=True):
            rows.append(("cmr_fit_scaled", r["layer"], r["head"], float(x), float(y)))
        for x, y in zip(fit.lags, fit.attn_scaled[idx], strict=True):
            rows.append(("attn_scaled", r["layer"], r["head"], float(x), float(y)))
    return rows


@register
class CMRDetector(_LagCRPBase[CMRConfig]):
    name = "cmr"
    description = "CMR fit of every head's attention lag-CRP (Ji-An et al.): distance, fitted parameters, CMR-like labels"
    head_columns: ClassVar[dict[str, str]] = {
        "cmr_distance": "distance", "cmr_like": "cmr-like", "crp_plus1": "crp+1", "asymmetry": "asym",
        "beta_enc": "b_enc", "beta_rec": "b_rec", "gamma_ft": "g_ft"}
    curve_axes: ClassVar[dict[str, tuple[str, str]]] = {
        **_LagCRPBase.curve_axes,
        "attn_scaled": ("lag: key - matching position in the first list (tokens)", "attention weight, shifted to min 0 (CMR fit scaled to it)"),
        "cmr_fit_scaled": ("lag: key - matching position in the first list (tokens)", "attention weight, shifted to min 0 (CMR fit scaled to it)"),
    }
    in_default_scan = True
    Config = CMRConfig

    def variant(self, cfg: CMRConfig) -> str:
        # At most 40 characters while grid_sims has at most 7 digits.
        return f"{cfg.lists}-lists/cmr-grid-{cfg.grid_estimator}-{cfg.grid_sims}"

    def method_text(self, cfg: CMRConfig) -> str:
        return (f"attention lag-CRP of every head on {cfg.lists} lists, fitted by the CMR model (Ji-An et al. "
                f"2024) over a simulated parameter grid ({cfg.grid_estimator} estimator, {cfg.grid_sims} trials "
                f"per start position): distance = mean squared error / variance of the shifted attention curve "
                f"over lags -{cfg.fit_lag}..{cfg.fit_lag}; CMR-like below {cmr_model.CMR_LIKE}")

    def finalize(self, model: LoadedModel, cfg: CMRConfig, results: Mapping[str, pd.DataFrame]) -> Summary:
        crp, lags, spc, table = self.aggregate(model, results)
        grid = cmr_model.cmr_grid(grid_spec(cfg))
        records, fit = cmr_records(crp, lags, grid, cfg.fit_lag)
        for r, extra in zip(records, lag_records(crp, lags, spc), strict=True):
            r.update({k: v for k, v in extra.items() if k not in ("layer", "head")})
        dist = np.array([r["cmr_distance"] for r in records])
        order = np.argsort(np.nan_to_num(dist, nan=np.inf), kind="stable")
        ranked = [records[i] for i in order]
        heads = [_finite({**r, "score": -r["cmr_distance"]}) for r in ranked]
        warnings = []
        n_nan = int(np.isnan(dist).sum())
        if n_nan:
            warnings.append(f"{n_nan} heads have a flat lag-CRP (no variance): no CMR distance")
        metrics = {
            "n_heads": len(records),
            "n_fitted": int(np.isfinite(dist).sum()),
            "n_cmr_like": sum(r["cmr_like"] for r in records),
            "n_cmr_like_strict": sum(r["cmr_like_strict"] for r in records),
            "cmr_like_threshold": cmr_model.CMR_LIKE,
            "cmr_like_strict_threshold": cmr_model.CMR_LIKE_STRICT,
            "cmr_like_by_layer": _by_layer(records, "cmr_like"),
            "cmr_like_strict_by_layer": _by_layer(records, "cmr_like_strict"),
            "median_distance": float(np.nanmedian(dist)),
            **cmr_model.describe(grid),
        }
        curves = pd.concat([table, tables.curves(_fit_curve_rows(records, fit))], ignore_index=True)
        head_rows = [
            (m, r["layer"], r["head"], float(r[m]))
            for r in ranked
            for m in ("cmr_distance", "beta_enc", "beta_rec", "gamma_ft", "crp_plus1", "asymmetry", "primacy", "recency")
        ]
        return Summary(
            detector=self.name,
            variant=self.variant(cfg),
            heads=heads,
            metrics=_finite(metrics),
            warnings=warnings,
            tables={
                "curves": curves,
                "head_scores": tables.head_scores(head_rows),
                "metrics": tables.metrics(metrics),
                "artifacts": tables.artifact("grid", cmr_model.describe(grid)),
            },
        )


# --------------------------------------------------------------------------------------------
# Copying scores next to prefix-matching scores
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyingConfig(DetectorConfig):
    """Parameters of ``copying``: the OV score reads the weights alone; these set the inputs of
    the prefix-matching score."""

    seq_len: int = param(50, "length R of the random block for the prefix-matching score", low=2)
    n_prompts: int = param(10, "repeated-token prompts for the prefix-matching score", low=1)
    seed: int = param(0, "random seed of the token batch", low=0, high=SEED_MAX)


@register
class CopyingDetector(Detector[CopyingConfig]):
    name = "copying"
    description = "OV copying score (eigenvalues, low-rank) of every head next to its prefix-matching score"
    output = "head_scores"
    head_columns: ClassVar[dict[str, str]] = {"copying": "copying", "induction_head": "induction head"}
    in_default_scan = True
    Config = CopyingConfig

    def variant(self, cfg: CopyingConfig) -> str:
        return "eig-lowrank/ln-weights-folded"

    def method_text(self, cfg: CopyingConfig) -> str:
        return ("copying score sum(lambda) / sum(|lambda|) over the eigenvalues of each head's OV token map "
                "W_E W_V W_O W_U (Olsson et al. 2022), from its d_head x d_head low-rank form with the norm "
                "weights folded in, next to the head's prefix-matching score on repeated random tokens")

    def units(self, model: LoadedModel, cfg: CopyingConfig) -> list[str]:
        model.check_length(2 * cfg.seq_len + len(model.prefix))
        return ["ov", "prefix-matching"]

    def example_tokens(self, model: LoadedModel, cfg: CopyingConfig) -> torch.Tensor:
        return repeated_random_tokens(model, cfg.n_prompts, cfg.seq_len, cfg.seed)

    def run_unit(self, model: LoadedModel, cfg: CopyingConfig, unit: str) -> UnitResult:
        if unit == "ov":
            return UnitResult(tables={"head_scores": tables.head_grid("copying", copying_scores(model))})
        tokens = self.example_tokens(model, cfg)
        with torch.no_grad():
            out = model.run(tokens, cache=["pattern.*"])
        patterns = [out.cache[f"pattern.{layer}"] for layer in range(model.info.n_layers)]
        scores = head_scores_from_patterns(patterns, cfg.seq_len, len(model.prefix))["induction"]
        # float32 first: numpy has no bfloat16, and widening is exact.
        return UnitResult(tables={"head_scores": tables.head_grid("prefix_matching", scores.float())})

    def finalize(self, model: LoadedModel, cfg: CopyingConfig, results: Mapping[str, pd.DataFrame]) -> Summary:
        hs = results["head_scores"]
        rows = [
            (str(metric), int(layer), int(head), float(value))
            for metric, layer, head, value in zip(
                _col(hs, "metric"), _col(hs, "layer"), _col(hs, "head"), _col(hs, "value"), strict=True
            )
        ]
        vals: dict[tuple[int, int], dict[str, float]] = {}
        for metric, layer, head, value in rows:
            vals.setdefault((layer, head), {})[metric] = value
        heads = [
            {
                "layer": layer,
                "head": head,
                "score": v["prefix_matching"],
                "prefix_matching": v["prefix_matching"],
                "copying": v["copying"],
                "induction_head": v["prefix_matching"] > INDUCTION_THRESHOLD and v["copying"] > 0,
            }
            for (layer, head), v in vals.items()
        ]
        heads.sort(key=lambda h: -h["score"])
        pm = np.array([h["prefix_matching"] for h in heads])
        cp = np.array([h["copying"] for h in heads])
        from scipy import stats

        metrics = {
            "n_heads": len(heads),
            "n_copying_positive": int((cp > 0).sum()),
            "n_prefix_matching_above_threshold": int((pm > INDUCTION_THRESHOLD).sum()),
            "n_induction_heads": sum(h["induction_head"] for h in heads),
            "threshold": INDUCTION_THRESHOLD,
            "top10_prefix_matching_min_copying": float(cp[:10].min()),
            "spearman_prefix_matching_copying": float(stats.spearmanr(pm, cp).statistic),  # type: ignore[attr-defined]
        }
        return Summary(
            detector=self.name,
            variant=self.variant(cfg),
            heads=heads,
            metrics=_finite(metrics),
            tables={"head_scores": tables.head_scores(rows), "metrics": tables.metrics(metrics)},
        )



# --------------------------------------------------------------------------------------------
# Causal checks: ablation of top-k heads against random heads
# --------------------------------------------------------------------------------------------


def text_chunks(model: LoadedModel, n: int, seq_len: int, path: Path = TEXT_SAMPLE) -> torch.Tensor:
    """Non-overlapping windows of the text sample: the prompt prefix (when the model has one)
    + tokens."""
    ids = model.tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    body = seq_len - len(model.prefix)
    available = len(ids) // body
    if available < 1:
        raise UserError(f"the text sample has {len(ids)} tokens: not one window of {seq_len}")
    n = min(n, available) if n > 0 else available
    rows = torch.tensor(ids[: n * body]).reshape(n, body)
    prefix = torch.tensor(model.prefix.ids, dtype=torch.long).expand(n, len(model.prefix))
    return torch.cat([prefix, rows], dim=1)


def per_token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """nll[:, i] = loss of predicting token i+1 (TransformerLens's per-token convention)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0]


def t_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and t confidence interval."""
    from scipy import stats

    x = np.asarray(x, dtype=float)
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def paired_p(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2 or np.allclose(d, d[0]):
        return float("nan")  # no spread of the differences: the t statistic is undefined
    return float(stats.ttest_rel(a, b).pvalue)



def rank_heads(model: LoadedModel, score: str, seed: int) -> list[tuple[int, int]]:
    """All heads, best first by ``score``: copying score, attention lag-CRP at lag +1
    (induction) or CMR distance, the last two on 20 repeated lists of 50 tokens."""
    if score == "copying":
        s = copying_scores(model).cpu().numpy()
        order = np.argsort(-s.reshape(-1), kind="stable")
    else:
        prompts = repeated_lists(model, 20, 50, seed)
        res = lag_crp_unit(model, prompts, 8)
        crp = res["sums"] / np.maximum(res["counts"], 1)
        lags = np.arange(-8, 9)
        if score == "induction":
            order = np.argsort(-crp[..., int(np.flatnonzero(lags == 1)[0])].reshape(-1), kind="stable")
        else:
            fit = cmr_model.fit_cmr(crp.reshape(-1, len(lags)), lags, cmr_model.cmr_grid(), cmr_model.FIT_LAG)
            dist = np.nan_to_num(fit.distance, nan=np.inf)
            order = np.argsort(dist, kind="stable")
    n_h = model.info.n_heads
    return [(int(i) // n_h, int(i) % n_h) for i in order]


def mean_z(model: LoadedModel, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's z averaged over the batch and the positions (mean ablation's reference)."""
    with torch.no_grad():
        out = model.run(tokens, cache=["z.*"])
    return {name: z.mean(dim=(0, 1), keepdim=True) for name, z in out.cache.items()}


def ablation_effects(
    curves: pd.DataFrame, units: Sequence[str], draws: Sequence[str]
) -> tuple[dict[str, Any], list[tuple[str, float, float | None, float | None, int | None]]]:
    """Per measure: the clean value and the change under each ablation (top-k, the mean of the
    random draws, each single and cumulative set) against clean, with t intervals and the
    paired p-value of top-k against random; as summary metrics and ``metrics`` rows."""
    c_unit, c_curve, c_x, c_y = (_col(curves, c) for c in ("unit", "curve", "x", "y"))

    def values(unit: str, metric: str) -> np.ndarray:
        sel = (c_unit == unit) & (c_curve == metric)
        return c_y[sel][np.argsort(c_x[sel].astype(float))].astype(float)

    metrics: dict[str, Any] = {}
    rows: list[tuple[str, float, float | None, float | None, int | None]] = []
    for metric in ("icl", "icl_window", "second_copy_loss"):
        clean = values("clean", metric)
        top = values("top", metric)
        rand = np.mean([values(u, metric) for u in draws], axis=0)
        metrics[f"{metric}_clean"] = float(clean.mean())
        for name, arr in (("top", top), ("random", rand)):
            m, lo, hi = t_interval(arr - clean)
            metrics[f"{metric}_delta_{name}"] = m
            metrics[f"{metric}_delta_{name}_ci"] = [lo, hi]
            rows.append((f"{metric}_delta_{name}", m, lo, hi, len(arr)))
        m, lo, hi = t_interval(top - rand)
        metrics[f"{metric}_top_minus_random"] = m
        metrics[f"{metric}_top_minus_random_ci"] = [lo, hi]
        metrics[f"{metric}_paired_p"] = paired_p(top, rand)
        rows.append((f"{metric}_top_minus_random", m, lo, hi, len(top)))
        rows.append((f"{metric}_paired_p", metrics[f"{metric}_paired_p"], None, None, len(top)))
        per_draw = [float((values(u, metric) - clean).mean()) for u in draws]
        metrics[f"{metric}_delta_random_per_draw"] = per_draw
        for u in units:
            if u.startswith(("single-", "cum-")):
                mm, lo2, hi2 = t_interval(values(u, metric) - clean)
                metrics[f"{metric}_delta_{u}"] = mm
                rows.append((f"{metric}_delta_{u}", mm, lo2, hi2, len(clean)))
    return metrics, rows


def _unit_heads(artifacts: pd.DataFrame, unit: str) -> list[tuple[int, ...]]:
    """The heads a unit ablated (its ``heads`` artifact); none when it has no such artifact."""
    doc = tables.read_artifact(artifacts.loc[_col(artifacts, "unit") == unit], "heads")
    return [tuple(h) for h in doc or []]


@dataclass(frozen=True)
class EpisodicAblationConfig(DetectorConfig):
    """Parameters of ``episodic-ablation`` (each field's help says what it is)."""

    score: Literal["cmr", "induction", "copying"] = param(
        "cmr", "rank heads by: CMR distance, prefix-matching or copying"
    )
    k: int = param(0, "heads ablated together (0: 10% of all heads, as Ji-An et al.)", low=0)
    n_draws: int = param(3, "random sets of k heads drawn outside the top set", low=1)
    method: Literal["zero", "mean"] = param("zero", "ablation of the heads' value vectors (z)")
    n_texts: int = param(8, "512-token windows of the bundled text (0: all)", low=0)
    # 0 < early < late < seq_len - 1 (check); the lows are what that implies alone.
    seq_len: int = param(512, "tokens per text window, prompt prefix included", low=4)
    late: int = param(500, "ICL score = loss at this token index ...", low=2)
    early: int = param(50, "... minus loss at this one", low=1)
    window: int = param(
        25, "also report a windowed ICL score: mean loss over `window` tokens ending at each index", low=1
    )
    n_single: int = param(3, "single-head ablations of the top heads (at most k)", low=0)
    cum_sizes: tuple[int, ...] = param((1, 3), "cumulative ablations of the top-n heads (k is always included)", low=1)
    rep_len: int = param(50, "length R of the repeated random tokens for the second-copy loss", low=2)
    rep_prompts: int = param(8, "repeated-token prompts for the second-copy loss", low=1)
    batch_size: int = param(4, "texts per forward pass", low=1)
    seed: int = param(0, "seed of the random draws and repeated tokens", low=0, high=SEED_MAX)

    def check(self) -> None:
        super().check()
        early, late, seq_len = self.early, self.late, self.seq_len
        if not 0 < early < late < seq_len - 1:
            raise UserError(f"need 0 < early < late < seq_len - 1, got early={early}, late={late}, seq_len={seq_len}")
        if self.window > early + 1:
            raise UserError(f"window must be in 1..early+1 ({early + 1}), got {self.window}")
        if self.k and self.n_single > self.k:
            raise UserError(f"n_single must be in 0..k ({self.k}), got {self.n_single}")


@register
class EpisodicAblationDetector(Detector[EpisodicAblationConfig]):
    name = "episodic-ablation"
    description = "Ablate the top-k heads by a score vs k random heads: ICL score and second-copy loss with CIs"
    output = "intervention"
    head_columns: ClassVar[dict[str, str]] = {"single_delta_icl": "alone: icl", "single_delta_second_copy_loss": "alone: 2nd loss"}
    curve_axes: ClassVar[dict[str, tuple[str, str]]] = {
        "icl": ("text window (index)", "ICL score: loss at token late - loss at token early (nats)"),
        "icl_window": ("text window (index)", "windowed ICL score: mean loss difference (nats)"),
        "second_copy_loss": ("repeated-token prompt (index)", "loss on the second copy (nats per token)"),
    }
    Config = EpisodicAblationConfig

    def variant(self, cfg: EpisodicAblationConfig) -> str:
        return f"{cfg.method}-ablation/top-by-{cfg.score}"

    def method_text(self, cfg: EpisodicAblationConfig) -> str:
        return (f"{cfg.method} ablation of the value vectors (z) of the top-k heads by {cfg.score} score against "
                f"{cfg.n_draws} draws of k random heads outside the top set, single-head and cumulative "
                "ablations (McGrath et al. 2023): change of the ICL score (loss at token late minus loss at token "
                "early, Olsson et al. 2022) on text windows and of the second-copy loss on repeated tokens, "
                "t intervals and a paired t-test")

    def dataset_hash(self, model: LoadedModel, cfg: EpisodicAblationConfig) -> str | None:
        return hashlib.sha256(TEXT_SAMPLE.read_bytes()).hexdigest()

    def _k(self, model: LoadedModel, cfg: EpisodicAblationConfig) -> int:
        return cfg.k or max(1, round(0.1 * model.info.n_total_heads))

    def units(self, model: LoadedModel, cfg: EpisodicAblationConfig) -> list[str]:
        k = self._k(model, cfg)
        total = model.info.n_total_heads
        if 2 * k > total:
            raise UserError(f"k must be in 1..{total // 2} so that k random heads fit outside the top k")
        if cfg.n_single > k:
            raise UserError(f"n_single must be in 0..k ({k})")
        model.check_length(cfg.seq_len)
        model.check_length(2 * cfg.rep_len + len(model.prefix))
        text_chunks(model, cfg.n_texts, cfg.seq_len)
        sizes = [s for s in sorted(set(cfg.cum_sizes)) if s < k]
        units = ["clean", "top", *(f"random-{d}" for d in range(cfg.n_draws))]
        units += [f"single-{i}" for i in range(cfg.n_single)]
        units += [f"cum-{s}" for s in sizes]
        return units

    def example_tokens(self, model: LoadedModel, cfg: EpisodicAblationConfig) -> torch.Tensor:
        return text_chunks(model, cfg.n_texts, cfg.seq_len)

    def ranking(self, model: LoadedModel, cfg: EpisodicAblationConfig) -> list[tuple[int, int]]:
        """All heads, best first by the chosen score (computed once per run, deterministically)."""
        return self.memo("ranking", model, cfg, lambda: rank_heads(model, cfg.score, cfg.seed))

    def heads_for(self, model: LoadedModel, cfg: EpisodicAblationConfig, unit: str) -> list[tuple[int, int]]:
        ranked = self.ranking(model, cfg)
        k = self._k(model, cfg)
        if unit == "clean":
            return []
        if unit == "top":
            return ranked[:k]
        kind, idx = unit.split("-")
        i = int(idx)
        if kind == "random":
            # Draw i has its own generator, so a resumed run redraws exactly the missing draws.
            return random_heads(ranked, ranked[:k], k, np.random.default_rng([cfg.seed, i]))
        if kind == "single":
            return [ranked[i]]
        return ranked[:i]

    def _sources(self, model: LoadedModel, cfg: EpisodicAblationConfig, tokens: torch.Tensor) -> dict[str, Any]:
        if cfg.method != "mean":
            return {}
        # Mean ablation replaces z by its mean over the clean text windows (batch and positions).
        return {"ref": self.memo("mean-z", model, cfg, lambda: mean_z(model, tokens))}

    def _interventions(self, heads: list[tuple[int, int]], cfg: EpisodicAblationConfig) -> list[Intervention]:
        if not heads:
            return []
        return ablate_heads(heads, cfg.method, source="ref" if cfg.method == "mean" else None)

    def run_unit(self, model: LoadedModel, cfg: EpisodicAblationConfig, unit: str) -> UnitResult:
        heads = self.heads_for(model, cfg, unit)
        texts = text_chunks(model, cfg.n_texts, cfg.seq_len)
        sources = self._sources(model, cfg, texts)
        ivs = self._interventions(heads, cfg)
        late, early, w = cfg.late, cfg.early, cfg.window
        icl, icl_w = [], []
        for start in range(0, texts.shape[0], cfg.batch_size):
            batch = texts[start : start + cfg.batch_size]
            with torch.no_grad():
                logits = model.run(batch, interventions=ivs, sources=sources).logits
            nll = per_token_nll(logits, batch)
            icl += (nll[:, late] - nll[:, early]).tolist()
            icl_w += (nll[:, late - w + 1 : late + 1].mean(1) - nll[:, early - w + 1 : early + 1].mean(1)).tolist()
        rep = repeated_random_tokens(model, cfg.rep_prompts, cfg.rep_len, cfg.seed + 7919)
        with torch.no_grad():
            logits = model.run(rep, interventions=ivs, sources=sources).logits
        second = [copy_losses(logits[i : i + 1], rep[i : i + 1], cfg.rep_len, len(model.prefix))[1] for i in range(rep.shape[0])]
        rows = [("icl", -1, -1, float(i), v) for i, v in enumerate(icl)]
        rows += [("icl_window", -1, -1, float(i), v) for i, v in enumerate(icl_w)]
        rows += [("second_copy_loss", -1, -1, float(i), v) for i, v in enumerate(second)]
        return UnitResult(
            tables={"curves": tables.curves(rows), "artifacts": tables.artifact("heads", [list(h) for h in heads])}
        )

    def finalize(
        self, model: LoadedModel, cfg: EpisodicAblationConfig, results: Mapping[str, pd.DataFrame]
    ) -> Summary:
        k = self._k(model, cfg)
        units = self.units(model, cfg)
        draws = [u for u in units if u.startswith("random-")]
        metrics: dict[str, Any] = {"k": k, "n_draws": len(draws), "method": cfg.method, "score": cfg.score}
        effects, rows = ablation_effects(results["curves"], units, draws)
        metrics.update(effects)
        ranked = self.ranking(model, cfg)[:k]
        heads = [
            {
                "layer": layer,
                "head": head,
                "rank": i,
                "score": float(-i),
                "single_delta_icl": metrics.get(f"icl_delta_single-{i}"),
                "single_delta_second_copy_loss": metrics.get(f"second_copy_loss_delta_single-{i}"),
            }
            for i, (layer, head) in enumerate(ranked)
        ]
        metrics["top_heads"] = [head_label(layer, head) for layer, head in ranked]
        metrics["random_heads"] = {
            u: [head_label(a, b) for a, b in _unit_heads(results["artifacts"], u)] for u in draws
        }
        return Summary(
            detector=self.name,
            variant=self.variant(cfg),
            heads=heads,
            metrics=_finite(metrics),
            tables={"metrics": tables.metric_rows(rows)},
        )



# --------------------------------------------------------------------------------------------
# Figures (shared by the notebook and the dashboard)
# --------------------------------------------------------------------------------------------


def fig_induction_copying(heads: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Prefix-matching vs copying score of every head (``copying`` summary heads)."""
    import plotly.express as px

    df = pd.DataFrame(heads)
    df["label"] = "L" + df["layer"].astype(str) + "H" + df["head"].astype(str)
    fig = px.scatter(
        df, x="prefix_matching", y="copying", color="layer", hover_name="label",
        title="Prefix-matching vs OV copying score",
        labels={"prefix_matching": "prefix-matching score (attention to the token after the earlier copy)",
                "copying": "OV copying score: sum(eigenvalues) / sum(|eigenvalues|)"},
    )
    fig.add_vline(x=INDUCTION_THRESHOLD, line_dash="dot")
    fig.add_hline(y=0, line_dash="dot")
    return fig


def fig_lag_crp_fits(curves: pd.DataFrame, heads: Sequence[Mapping[str, Any]], n: int = 6) -> go.Figure:
    """Lag-CRP of the first ``n`` heads (attention shifted to min 0) with their scaled CMR fit."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    sel = list(heads)[:n]
    cols = min(3, max(1, len(sel)))
    rows = max(1, math.ceil(len(sel) / cols))
    titles = [f"L{h['layer']}H{h['head']} d={h.get('cmr_distance', float('nan')):.2f}" for h in sel]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles)
    for i, h in enumerate(sel):
        r, c = i // cols + 1, i % cols + 1
        for name, dash in (("attn_scaled", None), ("cmr_fit_scaled", "dash")):
            sel = (_col(curves, "curve") == name) & (_col(curves, "layer") == h["layer"]) & (_col(curves, "head") == h["head"])
            xs, ys = _col(curves, "x")[sel].astype(float), _col(curves, "y")[sel].astype(float)
            order = np.argsort(xs)
            fig.add_trace(
                go.Scatter(x=xs[order], y=ys[order], mode="lines+markers", name=name, line={"dash": dash},
                           showlegend=i == 0, legendgroup=name),
                row=r, col=c,
            )
    fig.update_layout(title="Attention lag-CRP (shifted) and CMR fit (scaled)")
    x_title, y_title = CMRDetector.curve_axes["attn_scaled"]
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title, col=1)
    return fig


def fig_cmr_layers(heads: Sequence[Mapping[str, Any]], n_layers: int) -> go.Figure:
    """Number of CMR-like heads (distance < 0.5, and < 0.1) per layer."""
    import plotly.graph_objects as go

    df = pd.DataFrame(heads)
    layers = np.arange(n_layers)
    like = df[df["cmr_like"]].groupby("layer").size().reindex(layers, fill_value=0)
    strict = df[df["cmr_like_strict"]].groupby("layer").size().reindex(layers, fill_value=0)
    fig = go.Figure([
        go.Bar(x=layers, y=like.values, name=f"distance < {cmr_model.CMR_LIKE}"),
        go.Bar(x=layers, y=strict.values, name=f"distance < {cmr_model.CMR_LIKE_STRICT}"),
    ])
    fig.update_layout(barmode="group", title="CMR-like heads by layer", xaxis_title="layer",
                      yaxis_title="CMR-like heads (count)")
    return fig


def fig_ablation(metrics: Mapping[str, Any]) -> go.Figure:
    """Change of ICL score and second-copy loss: top-k vs random-k (95% CIs)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = ("icl", "icl_window", "second_copy_loss")
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[f"delta {n}" for n in names])
    for i, metric in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for group in ("top", "random"):
            m = metrics[f"{metric}_delta_{group}"]
            ci = metrics[f"{metric}_delta_{group}_ci"]
            xs.append(f"{group}-{metrics['k']}")
            ys.append(m)
            lo.append(m - ci[0])
            hi.append(ci[1] - m)
        fig.add_trace(
            go.Bar(x=xs, y=ys, error_y={"type": "data", "array": hi, "arrayminus": lo}, showlegend=False),
            row=1, col=i + 1,
        )
        fig.update_xaxes(title_text="heads ablated", row=1, col=i + 1)
        fig.update_yaxes(title_text=f"change of {metric} vs clean (nats)", row=1, col=i + 1)
    fig.update_layout(title=f"Ablating top-{metrics['k']} ({metrics['score']}) vs random heads ({metrics['method']})")
    return fig

