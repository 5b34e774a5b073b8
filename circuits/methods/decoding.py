"""Batched greedy decoding with a KV cache: the one loop behind retrieval scoring, PH3 and DeCoRe.

A prefill pass runs the prompts; then each step feeds every row's chosen token against the
cache. ``choose`` turns the output of the pass that ends at a step's position into that step's
tokens (default: the argmax of the last position). It is where the retrieval score reads each
step's attention (Wu et al. 2024) and where DeCoRe contrasts a base row with its masked twin
(Gema et al. 2024); interventions act on every pass, the prefill's may differ (DeCoRe's shared
prefill).

A batch may hold several rows per sequence: with ``n`` sequences, rows ``i``, ``i + n``, ...
belong to sequence ``i`` (DeCoRe's stacked [base; masked] batch). ``choose`` returns one token
per sequence and each of its rows is fed that token.

The model is anything :class:`Decodable`: a LoadedModel (its hook backend) or a plain
transformers model in :class:`circuits.methods.hf_runner.HFRunner` (torch hooks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from interp.errors import UserError
from interp.model.backends import RunOutput
from interp.model.interventions import Intervention

Choose = Callable[[RunOutput], torch.Tensor]


class Decodable(Protocol):
    """What the decoding loop needs of a model: a LoadedModel has it, and so has an HFRunner."""

    tokenizer: Any

    @property
    def device(self) -> torch.device: ...

    def check_length(self, n_tokens: int) -> None: ...

    def check_head(self, layer: int, head: int) -> None: ...

    def encode(self, text: str, prefix: bool = True) -> list[int]: ...

    def run(
        self,
        input_ids: torch.Tensor,
        *,
        interventions: Sequence[Intervention] = (),
        cache: Sequence[str] = (),
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> RunOutput: ...


@dataclass
class Decoded:
    tokens: list[list[int]]  # per sequence, up to and including its stop token
    stops: list[str]  # per sequence: "eos", "newline" or "length"


def stop_reason(model: Decodable, token: int, stop_at_newline: bool) -> str | None:
    """Why ``token`` ends a sequence: "eos", "newline" (a token holding a newline, when asked:
    the retrieval reference stops there), or None."""
    eos = model.tokenizer.eos_token_id
    if isinstance(eos, int) and token == eos:
        return "eos"
    if stop_at_newline and "\n" in str(model.tokenizer.decode([token])):
        return "newline"
    return None


def prompt_rows(model: Decodable, prompts: Sequence[str | Sequence[int]], prefix: bool = True) -> list[list[int]]:
    """Token ids per prompt: text through ``model.encode`` (after the prompt prefix unless
    ``prefix`` is False), token lists as they are."""
    rows = [model.encode(p, prefix) if isinstance(p, str) else [int(i) for i in p] for p in prompts]
    if any(not r for r in rows):
        raise UserError("empty prompt")
    return rows


def pad_id(model: Decodable) -> int:
    for cand in (model.tokenizer.pad_token_id, model.tokenizer.eos_token_id, model.tokenizer.bos_token_id):
        if isinstance(cand, int):
            return cand
    return 0


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, W] ids and 0/1 attention mask, real tokens right-aligned (so every row's next token
    sits at the last position)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def _argmax(out: RunOutput) -> torch.Tensor:
    return out.logits[:, -1].argmax(-1)


def _grow(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)


def _prefill(model: Decodable, ids: torch.Tensor, mask: torch.Tensor | None, first_ivs: Sequence[Intervention],
             step_ivs: Sequence[Intervention], cache: Sequence[str], kv_cache: bool,
             feed_last_token: bool) -> RunOutput:
    """The prompt's pass (passes, with ``feed_last_token``) whose output picks the first token."""
    if not kv_cache:
        return model.run(ids, interventions=step_ivs, cache=cache, attention_mask=mask)
    if feed_last_token:
        pre = model.run(ids[:, :-1], interventions=first_ivs, use_cache=True,
                        attention_mask=None if mask is None else mask[:, :-1])
        return model.run(ids[:, -1:], interventions=step_ivs, cache=cache, attention_mask=mask,
                         past_key_values=pre.past_key_values)
    return model.run(ids, interventions=first_ivs, cache=cache, attention_mask=mask, use_cache=True)


def _append(model: Decodable, nxt: torch.Tensor, tokens: list[list[int]], stops: list[str], done: list[bool],
            stop_at_newline: bool) -> None:
    """Each unfinished sequence's next token, and why it stops if it does."""
    for i, tok in enumerate(nxt.tolist()):
        if done[i]:
            continue
        tokens[i].append(int(tok))
        why = stop_reason(model, int(tok), stop_at_newline)
        if why is not None:
            stops[i], done[i] = why, True


def greedy_decode(
    model: Decodable,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    interventions: Sequence[Intervention] = (),
    prefill_interventions: Sequence[Intervention] | None = None,
    cache: Sequence[str] = (),
    choose: Choose | None = None,
    stop_at_newline: bool = False,
    feed_last_token: bool = False,
    kv_cache: bool = True,
) -> Decoded:
    """Decode ``input_ids`` [rows, width] greedily until every sequence stops (EOS, or a
    newline with ``stop_at_newline``) or ``max_new_tokens``.

    ``prefill_interventions`` (None: ``interventions``) act on the prefill, ``interventions``
    on every later pass. ``cache`` sites are recorded on each pass that ``choose`` reads.
    ``feed_last_token``: the prefill stops one token short and the first step feeds the last
    prompt token, so step 0's attention comes from a decoding step, as in the retrieval-score
    reference. ``kv_cache=False`` recomputes the whole sequence every step (backends that do
    not step HF's cache); every pass then covers the prompt, so prefill-only interventions
    cannot be honoured there.
    """
    if max_new_tokens < 1:
        raise UserError("max_new_tokens must be >= 1")
    if input_ids.ndim != 2 or input_ids.shape[1] < (2 if feed_last_token else 1):
        raise UserError(f"greedy decoding needs a [batch, >={2 if feed_last_token else 1} tokens] prompt")
    model.check_length(int(input_ids.shape[1]) + max_new_tokens)
    step_ivs = list(interventions)
    first_ivs = step_ivs if prefill_interventions is None else list(prefill_interventions)
    if not kv_cache and first_ivs != step_ivs:
        raise UserError("prefill-only interventions need the KV cache (backend 'bridge')")
    pick = choose or _argmax
    ids, mask = input_ids.to(model.device), None if attention_mask is None else attention_mask.to(model.device)
    n_rows = int(ids.shape[0])
    tokens: list[list[int]] = []
    stops: list[str] = []
    done: list[bool] = []
    with torch.no_grad():
        out = _prefill(model, ids, mask, first_ivs, step_ivs, cache, kv_cache, feed_last_token)
        for step in range(max_new_tokens):
            nxt = pick(out)
            if step == 0:
                if nxt.ndim != 1 or n_rows % len(nxt):
                    raise ValueError(f"choose must give one token per sequence of the {n_rows} rows")
                tokens, stops, done = [[] for _ in nxt], ["length"] * len(nxt), [False] * len(nxt)
            _append(model, nxt, tokens, stops, done, stop_at_newline)
            if all(done) or step == max_new_tokens - 1:
                break
            feed = nxt.repeat(n_rows // len(nxt))[:, None]
            mask = _grow(mask)
            if kv_cache:
                out = model.run(feed, interventions=step_ivs, cache=cache, attention_mask=mask,
                                past_key_values=out.past_key_values)
            else:
                ids = torch.cat([ids, feed.to(ids.device)], dim=1)
                out = model.run(ids, interventions=step_ivs, cache=cache, attention_mask=mask)
    return Decoded(tokens=tokens, stops=stops)


__all__ = ["Choose", "Decodable", "Decoded", "greedy_decode", "left_pad", "pad_id", "prompt_rows", "stop_reason"]
