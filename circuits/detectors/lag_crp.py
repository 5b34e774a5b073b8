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
  distance, fitted parameters, CMR-like labels (distance < 0.5; strict < 0.1), and each head
  against its null lag-CRPs (``circuits/methods/cmr_null.py``), read here in the same passes.
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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self, TypeVar

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from circuits.methods.lists import ListPrompts, mistry_lists, repeated_lists
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.patching.memory import activation_bytes, units_within
from interp.runs import tables
from interp.runs.config import SEED_MAX, DetectorConfig, param
from interp.runs.registry import Detector, Summary, UnitResult, register
from interp.runs.units import Unit

if TYPE_CHECKING:
    pass


# --------------------------------------------------------------------------------------------
# OV circuits and copying scores
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Attention lag-CRP
# --------------------------------------------------------------------------------------------


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


def match_null_from_pattern(
    pattern: Float[torch.Tensor, "batch head q k"], prompts: ListPrompts, perms: torch.Tensor, max_lag: int
) -> torch.Tensor:
    """The lag-CRP sums of a null that ignores where each query's match is [heads, draws, lags]:
    in draw d, second-list query i's match is taken to be first-list position ``perms[d, i]``.

    ``perms[d]`` is a bijection of the R first-list positions, so each lag has the same count of
    (query, key) pairs inside the first list as in :func:`lag_crp_from_pattern`."""
    off, r = prompts.offset, prompts.length
    lags = torch.arange(-max_lag, max_lag + 1, device=pattern.device)
    block = pattern[:, :, off + r : off + 2 * r, off : off + r].sum(dim=0).double()  # [H, R queries, R keys]
    idx = perms.to(pattern.device)[:, :, None] + lags  # [draws, R, lags]
    valid = (idx >= 0) & (idx < r)
    q = torch.arange(r, device=pattern.device)[None, :, None].expand_as(idx)
    att = block[:, q, idx.clamp(0, r - 1)] * valid  # [H, draws, R, lags]
    return att.sum(dim=2)


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


def lag_crp_unit(
    model: LoadedModel, prompts: ListPrompts, max_lag: int, null_perms: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Lag-CRP sums, counts and serial-position sums of every head for one batch of prompts, and
    with ``null_perms`` [draws, R] the sums of :func:`match_null_from_pattern` [L, H, draws, lags]."""
    b, seq = prompts.tokens.shape
    n_l, n_h = model.info.n_layers, model.info.n_heads
    sums = np.zeros((n_l, n_h, 2 * max_lag + 1))
    perms = None if null_perms is None else torch.as_tensor(null_perms, dtype=torch.long)
    null = np.zeros((n_l, n_h, 0 if perms is None else perms.shape[0], 2 * max_lag + 1))
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
            if perms is not None:
                null[layer] = match_null_from_pattern(pat, prompts, perms, max_lag).cpu().numpy()
        del out
    return {"sums": sums, "counts": counts, "spc": spc, "null_sums": null}


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
# The per-unit artifact holding the null lag-CRPs of :func:`match_null_from_pattern`.
NULL_ARTIFACT = "null_lag_crp"


class _LagCRPBase(Detector[LagC]):
    output = "curves"
    curve_axes: ClassVar[dict[str, tuple[str, str]]] = {
        "lag_crp": ("lag: key - matching position in the first list (tokens)", "attention weight (mean over queries)"),
        "serial_position": ("serial position in the first list (tokens)", "attention weight (mean over queries)"),
    }

    def units(self, model: LoadedModel, cfg: LagC) -> list[Unit]:
        p = cfg.resolved()
        model.check_length(2 * p.seq_len + len(model.prefix))
        if p.lists == "mistry" and p.seq_len > model.info.vocab_size // 2:
            raise UserError(f"mistry lists of {p.seq_len} tokens need a larger vocabulary")
        n, b = p.n_prompts, p.batch_size
        return [Unit("batch", i) for i in range((n + b - 1) // b)]

    def prompts(self, model: LoadedModel, cfg: LagC, unit: Unit) -> ListPrompts:
        p = cfg.resolved()
        i = int(unit.index or 0)
        size = min(p.batch_size, p.n_prompts - i * p.batch_size)
        seed = p.seed * 100_003 + i
        if p.lists == "mistry":
            return mistry_lists(model, size, p.seq_len, seed)
        return repeated_lists(model, size, p.seq_len, seed)

    def example_tokens(self, model: LoadedModel, cfg: LagC) -> torch.Tensor:
        return self.prompts(model, cfg, Unit("batch", 0)).tokens

    def null_perms(self, cfg: LagC, unit: Unit, length: int) -> np.ndarray | None:
        """The stand-in matches of a null lag-CRP [draws, length], or None for no null."""
        return None

    def run_unit(self, model: LoadedModel, cfg: LagC, unit: Unit) -> UnitResult:
        max_lag = cfg.max_lag
        prompts = self.prompts(model, cfg, unit)
        perms = self.null_perms(cfg, unit, prompts.length)
        res = lag_crp_unit(model, prompts, max_lag, perms)
        lags = np.arange(-max_lag, max_lag + 1)
        # Per-unit means; finalize re-weights by the number of queries (per-lag counts scale with it).
        crp = res["sums"] / np.maximum(res["counts"], 1)
        n_queries = prompts.tokens.shape[0] * prompts.length
        spc = res["spc"] / n_queries
        rows = _curve_rows("lag_crp", crp, lags) + _curve_rows("serial_position", spc, np.arange(prompts.length))
        out = {
            "curves": tables.curves(rows),
            "metrics": tables.metrics({"n_queries": n_queries}, n=int(prompts.tokens.shape[0])),
        }
        if perms is not None:
            # [L, H, draws, lags]: too many values for curve rows; one document per unit.
            out["artifacts"] = tables.artifact(NULL_ARTIFACT, res["null_sums"] / np.maximum(res["counts"], 1))
        return UnitResult(tables=out)

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


def null_array(results: Mapping[str, pd.DataFrame]) -> np.ndarray | None:
    """The null lag-CRPs of every unit averaged with the units' query counts as weights
    [L, H, draws, lags], as :meth:`_LagCRPBase.aggregate` averages the lag-CRP; None when the
    units hold none (a run stored before the null)."""
    arts, metrics = results["artifacts"], results["metrics"]
    sel = _col(metrics, "name") == "n_queries"
    weight = dict(zip(_col(metrics, "unit")[sel], _col(metrics, "value")[sel].astype(float), strict=True))
    units = [u for u, n in zip(_col(arts, "unit"), _col(arts, "name"), strict=True) if n == NULL_ARTIFACT]
    if not units:
        return None
    total = sum(weight[u] * np.asarray(tables.read_artifact(pd.DataFrame(arts[_col(arts, "unit") == u]), NULL_ARTIFACT))
                for u in units)
    return np.asarray(total) / sum(weight[u] for u in units)


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
        return Summary(heads=heads,
            metrics=_finite(metrics),
            tables={"curves": table, "head_scores": tables.head_scores(head_rows), "metrics": tables.metrics(metrics)},
        )


# --------------------------------------------------------------------------------------------
# CMR fit
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Copying scores next to prefix-matching scores
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Causal checks: ablation of top-k heads against random heads
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Figures (shared by the notebook and the dashboard)
# --------------------------------------------------------------------------------------------


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, recursively, so summaries are strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
