"""The clean and corrupt runs that path patching and edge attribution compare, cached once.

Path patching asks how a metric of the *clean* run changes when one edge carries the *corrupt*
run's value. Both runs are computed once per prompt set (:func:`pair_runs`), caching what every
sender and receiver reads: each layer's ``resid_pre``, ``z``, ``attn_out``, ``resid_mid`` and
``mlp_out``, and the last ``resid_post``. Calls for different receiver sets (one per Dask
worker, say) can share one :class:`PairRuns` or each compute their own: the result is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.patching.edges import Receiver
from interp.patching.metrics import LogProb, Metric, _check_metric
from interp.patching.receivers import ReceiverMaps
from interp.patching.sources import _check_tokens


@dataclass(frozen=True)
class PairRuns:
    """Clean and corrupt prompts (equal token lengths), the metric, and both runs' caches."""

    clean_tokens: torch.Tensor  # [n, p]
    corrupt_tokens: torch.Tensor  # [n, p]
    metric: Metric
    clean: dict[str, torch.Tensor]
    corrupt: dict[str, torch.Tensor]
    clean_metric: torch.Tensor  # [n] float64 on the CPU
    corrupt_metric: torch.Tensor
    map_error: float = 0.0  # the receiver maps against the clean run's own sites (relative)

    @property
    def n_prompts(self) -> int:
        return int(self.clean_tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.clean_tokens.shape[1])

    @property
    def gap(self) -> float:
        """Mean over prompts of m(clean) - m(corrupt): what the whole graph carries."""
        return float((self.clean_metric - self.corrupt_metric).mean())


def encode_pair(model: LoadedModel, prompts: str | Sequence[str],
                corrupt_prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of prompts and their corrupt versions, each pair of equal token length (a
    one-line UserError naming the first pair that differs)."""
    clean = [prompts] if isinstance(prompts, str) else list(prompts)
    corrupt = [corrupt_prompts] if isinstance(corrupt_prompts, str) else list(corrupt_prompts)
    if not clean:
        raise UserError("no prompts given")
    if len(clean) != len(corrupt):
        raise UserError(f"{len(clean)} prompts but {len(corrupt)} corrupt prompts; give one corrupt prompt per prompt")
    rows = [model.encode(t) for t in clean]
    bad = [model.encode(t) for t in corrupt]
    for text, c_text, a, b in zip(clean, corrupt, rows, bad, strict=True):
        if len(a) != len(b):
            raise UserError(f"prompt and corrupt prompt differ in token length ({len(a)} vs {len(b)}): "
                            f"{text!r} / {c_text!r}")
    if len({len(r) for r in rows}) != 1:
        raise UserError("prompts have different token lengths; give prompts of one length per call")
    model.check_length(len(rows[0]))
    return (torch.tensor(rows, dtype=torch.long, device=model.device),
            torch.tensor(bad, dtype=torch.long, device=model.device))


def answer_metric(answer_ids: Sequence[int], position: int = -1) -> LogProb:
    """The default metric: log p(answer's first token) at ``position`` (the last), per prompt."""
    return LogProb(list(answer_ids), position=position)


def cached_sites(n_layers: int) -> list[str]:
    last = n_layers - 1
    return ["resid_pre.*", "z.*", "attn_out.*", "resid_mid.*", "mlp_out.*", f"resid_post.{last}"]


def _check_maps(model: LoadedModel, tokens: torch.Tensor) -> float:
    """The receiver maps against the model's own q, k, v and mlp_out sites on one prompt, every
    layer (a UserError when they differ: no result may rest on a wrong map)."""
    info = model.info
    with torch.no_grad():
        acts = model.run(tokens[:1], cache=[*cached_sites(info.n_layers), "q.*", "k.*", "v.*"]).cache
    probe = [Receiver(kind, layer, 0) for layer in range(info.n_layers) for kind in ("q", "k", "v")]
    if model.layout.mlp_norm is not None:
        probe += [Receiver("mlp", layer) for layer in range(info.n_layers)]
    return ReceiverMaps(model).check(probe, acts)


def check_pair_tokens(model: LoadedModel, clean: torch.Tensor, corrupt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    clean = _check_tokens(model, clean, "prompt tokens")
    corrupt = _check_tokens(model, corrupt, "corrupt prompt tokens")
    if clean.shape != corrupt.shape:
        raise UserError(f"prompts and corrupt prompts differ in shape ({tuple(clean.shape)} vs "
                        f"{tuple(corrupt.shape)}): give one corrupt prompt of equal token length per prompt")
    return clean, corrupt


def pair_runs(model: LoadedModel, clean_tokens: torch.Tensor, corrupt_tokens: torch.Tensor,
              metric: Metric) -> PairRuns:
    """Run both prompt sets once, caching every site a sender or receiver reads."""
    clean_tokens, corrupt_tokens = check_pair_tokens(model, clean_tokens, corrupt_tokens)
    n = int(clean_tokens.shape[0])
    _check_metric(metric, n)
    sites = cached_sites(model.info.n_layers)
    idx = torch.arange(n, device=model.device)
    with torch.no_grad():
        clean = model.run(clean_tokens, cache=sites)
        corrupt = model.run(corrupt_tokens, cache=sites)
        positions = metric.positions
        pick = (slice(None) if positions is None else list(positions))
        m_clean = metric(clean.logits[:, pick], idx).double().cpu()
        m_corrupt = metric(corrupt.logits[:, pick], idx).double().cpu()
    map_error = _check_maps(model, clean_tokens)
    return PairRuns(clean_tokens, corrupt_tokens, metric, clean.cache, corrupt.cache, m_clean, m_corrupt, map_error)


__all__ = ["PairRuns", "answer_metric", "check_pair_tokens", "encode_pair", "pair_runs"]
