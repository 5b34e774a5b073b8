"""Copying scores (Olsson et al. 2022) next to the prefix-matching scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from circuits.detectors.induction import INDUCTION_THRESHOLD, head_scores_from_patterns
from circuits.detectors.lag_crp import _finite
from interp.model.layout import tensor_of, unwrap
from interp.model.loaded import LoadedModel
from interp.model.tokens import repeated_random_tokens
from interp.runs.config import SEED_MAX, DetectorConfig, param
from interp.runs.head_scores import HeadMeans, HeadScoreDetector, UnitScores
from interp.runs.registry import register
from interp.runs.units import Unit

if TYPE_CHECKING:
    import plotly.graph_objects as go


def _unwrap(module: Any) -> Any:
    """The HF module behind a TransformerBridge wrapper (:func:`interp.model.layout.unwrap`)."""
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


@dataclass(frozen=True)
class CopyingConfig(DetectorConfig):
    """Parameters of ``copying``: the OV score reads the weights alone; these set the inputs of
    the prefix-matching score."""

    seq_len: int = param(50, "length R of the random block for the prefix-matching score", low=2)
    n_prompts: int = param(10, "repeated-token prompts for the prefix-matching score", low=1)
    seed: int = param(0, "random seed of the token batch", low=0, high=SEED_MAX)


@register
class CopyingDetector(HeadScoreDetector[CopyingConfig]):
    name = "copying"
    description = "OV copying score (eigenvalues, low-rank) of every head next to its prefix-matching score"
    head_columns: ClassVar[dict[str, str]] = {"prefix_matching": "prefix-match", "induction_head": "induction head"}
    in_default_scan = True
    Config = CopyingConfig
    score = "copying"
    fields = ("copying", "prefix_matching")

    def variant(self, cfg: CopyingConfig) -> str:
        return "eig-lowrank/ln-weights-folded"

    def method_text(self, cfg: CopyingConfig) -> str:
        return ("copying score sum(lambda) / sum(|lambda|) over the eigenvalues of each head's OV token map "
                "W_E W_V W_O W_U (Olsson et al. 2022), from its d_head x d_head low-rank form with the norm "
                "weights folded in, next to the head's prefix-matching score on repeated random tokens")

    def units(self, model: LoadedModel, cfg: CopyingConfig) -> list[Unit]:
        model.check_length(2 * cfg.seq_len + len(model.prefix))
        return [Unit("ov"), Unit("prefix-matching")]

    def example_tokens(self, model: LoadedModel, cfg: CopyingConfig) -> torch.Tensor:
        return repeated_random_tokens(model, cfg.n_prompts, cfg.seq_len, cfg.seed)

    def score_unit(self, model: LoadedModel, cfg: CopyingConfig, unit: Unit) -> UnitScores:
        if unit.group == "ov":
            return UnitScores({"copying": copying_scores(model)})
        tokens = self.example_tokens(model, cfg)
        with torch.no_grad():
            out = model.run(tokens, cache=["pattern.*"])
        patterns = [out.cache[f"pattern.{layer}"] for layer in range(model.info.n_layers)]
        scores = head_scores_from_patterns(patterns, cfg.seq_len, len(model.prefix))["induction"]
        # float32 first: numpy has no bfloat16, and widening is exact.
        return UnitScores({"prefix_matching": scores.float()})

    def head_fields(self, values: Mapping[str, float]) -> dict[str, Any]:
        # An induction head both attends to the token after the earlier copy and copies it.
        return {"induction_head": values["prefix_matching"] > INDUCTION_THRESHOLD and values["copying"] > 0}

    def summary_metrics(
        self, model: LoadedModel, cfg: CopyingConfig, heads: list[dict[str, Any]], means: HeadMeans
    ) -> dict[str, Any]:
        by_pm = sorted(heads, key=lambda h: -h["prefix_matching"])
        pm = np.array([h["prefix_matching"] for h in by_pm])
        cp = np.array([h["copying"] for h in by_pm])
        from scipy import stats

        return _finite({
            "n_heads": len(heads),
            "n_copying_positive": int((cp > 0).sum()),
            "n_prefix_matching_above_threshold": int((pm > INDUCTION_THRESHOLD).sum()),
            "n_induction_heads": sum(h["induction_head"] for h in heads),
            "threshold": INDUCTION_THRESHOLD,
            "top10_prefix_matching_min_copying": float(cp[:10].min()),
            "spearman_prefix_matching_copying": float(stats.spearmanr(pm, cp).statistic),  # type: ignore[attr-defined]
        })


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
