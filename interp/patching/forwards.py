"""The forward passes of one sweep, each computing only the logits its metric reads."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from interp.model.interventions import Intervention
from interp.model.layout import tensor_of, unembedding
from interp.model.loaded import LoadedModel
from interp.patching.metrics import Metric, _logit_positions


def _prefix_kv(model: LoadedModel, pkv: Any, n_pos: int, copies: int) -> Any:
    """HF's KV cache of the base run's first ``n_pos`` positions, its rows tiled ``copies``
    times (row = copy * prompts + prompt, the chunk's layout)."""
    from transformers.cache_utils import DynamicCache

    data = [
        (layer.keys[:, :, :n_pos].repeat(copies, 1, 1, 1), layer.values[:, :, :n_pos].repeat(copies, 1, 1, 1))
        for layer in pkv.layers
    ]
    return DynamicCache(data, config=model.hf.config)


def _plain_kv(pkv: Any) -> bool:
    """Only full-attention dynamic caches can be cut at a position (not sliding windows or
    recurrent state)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(pkv) is DynamicCache and all(type(layer) is DynamicLayer for layer in pkv.layers)


@contextlib.contextmanager
def _unembed_only(head: torch.nn.Linear | None, vocab: tuple[int, ...] | None) -> Iterator[None]:
    """Make the unembedding compute the logits of ``vocab`` alone: a metric that reads two
    tokens need not pay for a d_model x vocab product per row."""
    if head is None or vocab is None:
        yield
        return
    weight = tensor_of(head)
    idx = torch.tensor(vocab, device=weight.device)
    w = weight[idx]
    b = None if head.bias is None else tensor_of(head, "bias")[idx]
    object.__setattr__(head, "forward", lambda h: torch.nn.functional.linear(h, w, b))
    try:
        yield
    finally:
        del head.__dict__["forward"]


class SweepForwards:
    """The forward passes of one sweep (its base run, then its chunks), each computing only
    the logits the metric reads, with counters of passes and token-layers.

    ``metric`` is what the caller asked for; ``self.metric`` is the one to apply to these
    passes' logits (over a few token ids when the metric says which it reads). Passes go
    through the backend's contract only: HF forward kwargs where the backend passes them
    (``capabilities.forward_kwargs``), ``run_from_layer`` for a pass that enters a layer."""

    def __init__(self, model: LoadedModel, metric: Metric, seq_len: int) -> None:
        self.model = model
        self.metric = metric
        self.seq_len = seq_len
        self.backend = model.backend
        # Only where the backend hands HF's forward our kwargs do we choose which logits it
        # computes (positions and, below, vocabulary); elsewhere logits are sliced afterwards.
        self.direct = self.backend.capabilities.forward_kwargs
        self.head: torch.nn.Linear | None = None
        self.vocab: tuple[int, ...] | None = None
        head = unembedding(model.hf) if self.direct else None
        on_vocab = getattr(metric, "on_vocab", None)
        if on_vocab is not None and isinstance(head, torch.nn.Linear):
            self.head = head
            self.vocab, self.metric = on_vocab()
        self.logit_positions = _logit_positions(metric, seq_len)
        self.keep: int | torch.Tensor = 0
        self.slice_after: tuple[int, ...] | None = self.logit_positions
        if (
            self.direct
            and self.logit_positions is not None
            and "logits_to_keep" in inspect.signature(model.hf.forward).parameters
        ):
            if self.logit_positions == (seq_len - 1,):
                self.keep = 1
            else:
                self.keep = torch.tensor(self.logit_positions, device=model.device)
            self.slice_after = None
        self.forwards = 0
        self.token_layers = 0

    @property
    def n_logit_positions(self) -> int:
        return self.seq_len if self.logit_positions is None else len(self.logit_positions)

    def _forward_kwargs(self, past: Any, keep_kv: bool, offset: int) -> dict[str, Any] | None:
        if not self.direct:
            return None
        fkw: dict[str, Any] = {} if (past is not None or keep_kv) else {"use_cache": False}
        keep = self.keep
        if isinstance(keep, torch.Tensor):
            keep = keep - offset
        if not isinstance(keep, int) or keep:
            fkw["logits_to_keep"] = keep
        return fkw

    def forward(
        self,
        tokens: torch.Tensor,
        interventions: Sequence[Intervention] = (),
        sources: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        *,
        start: int = 0,
        resid: torch.Tensor | None = None,
        cache: Sequence[str] = (),
        grad: bool = False,
        offload: bool = False,
        past: Any = None,
        offset: int = 0,
        keep_kv: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
        """Logits at the metric's positions [rows, k, vocab], the cache and HF's KV cache.

        With ``resid`` the pass enters block ``start`` with that residual (``start`` may be 0).
        With ``past`` (HF's KV cache of positions 0..offset-1) the pass computes positions
        offset.. only; ``keep_kv`` returns the pass's own KV cache.
        """
        self.forwards += 1
        n_pos = int(tokens.shape[1]) if resid is None else int(resid.shape[1])
        self.token_layers += tokens.shape[0] * n_pos * (self.model.info.n_layers - start)
        common: dict[str, Any] = {
            "interventions": interventions, "sources": sources, "cache": cache, "grad": grad,
            "cache_to_cpu": offload, "past_key_values": past, "use_cache": keep_kv,
            "forward_kwargs": self._forward_kwargs(past, keep_kv, offset),
        }
        with _unembed_only(self.head, self.vocab), warnings.catch_warnings():
            # transformers renames past_key_values to cache; the bridge still passes the old name.
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            if resid is not None:
                out = self.backend.run_from_layer(resid, start, **common)
            else:
                out = self.backend.run(tokens.to(self.model.device), **common)
        logits = out.logits
        if self.slice_after is not None:
            logits = logits[:, [p - offset for p in self.slice_after], :]
        return logits, out.cache, out.past_key_values
