"""DeCoRe scoring of given answers (Gema et al. 2024, arXiv:2410.18860): a candidate answer's
score is the sum over its tokens of the combined score (1 + alpha_t) logsoftmax(base) -
alpha_t logsoftmax(masked) of that token (the reference's ``lm_score``); the decoder itself is
:mod:`circuits.methods.decore`.

``alpha_scope="token"`` (default) takes alpha_t at each answer position; ``"prefix"`` (the
reference's ``lm_score``) uses the alpha of the first answer position for all its tokens.
``post_softmax`` renormalises the combined scores with a log-softmax before summing (the
reference's option of that name).

Batching: the base rows and the masked rows are stacked in one batch, [base; masked]; with
several head sets (``decore_score_sets``: the random-head control's draws) each set's masked
rows follow, sharing the base rows, each set's masking restricted to its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pandas as pd
import torch

from circuits.methods.decoding import left_pad, pad_id, prompt_rows
from circuits.methods.decore import (
    Alpha,
    DecoreSettings,
    Method,
    batches,
    combine,
    decore_alpha,
    mask_interventions,
)
from circuits.methods.heads import check_heads
from interp.errors import UserError
from interp.model.layout import Head
from interp.model.loaded import LoadedModel


def _answer_pairs(model: LoadedModel, rows: Sequence[list[int]],
                  answers: Sequence[Sequence[str]]) -> list[tuple[int, int, list[int], list[int]]]:
    """(prompt index, answer index, prompt tokens, answer tokens) of every candidate answer; an
    answer is tokenised on its own, without special tokens."""
    pairs: list[tuple[int, int, list[int], list[int]]] = []
    for pi, (p, cands) in enumerate(zip(rows, answers, strict=True)):
        if not cands:
            raise UserError(f"prompt {pi} has no candidate answers")
        for ai, a in enumerate(cands):
            toks = [int(t) for t in model.tokenizer(a, add_special_tokens=False)["input_ids"]]
            if not toks:
                raise UserError(f"answer {a!r} tokenises to nothing")
            pairs.append((pi, ai, p, toks))
    return pairs


def _base_and_masked_logits(model: LoadedModel, rows: Sequence[list[int]], head_sets: Sequence[Sequence[Head]],
                            settings: DecoreSettings) -> torch.Tensor:
    """[(1 + sets) * rows, width, vocab] float logits: the rows left-padded, then the same rows
    with each head set masked in turn."""
    b = len(rows)
    ids, mask = left_pad(rows, pad_id(model))
    n = 1 + len(head_sets)
    ids, mask = ids.repeat(n, 1).to(model.device), mask.repeat(n, 1).to(model.device)
    ivs = [iv for s, heads in enumerate(head_sets)
           for iv in mask_interventions(heads, settings.method, list(range((1 + s) * b, (2 + s) * b)))]
    with torch.no_grad():
        return model.run(ids, attention_mask=mask, interventions=ivs).logits.float()


def decore_score(
    model: LoadedModel,
    prompts: Sequence[str],
    answers: Sequence[Sequence[str]],
    heads: Sequence[Head],
    alpha: Alpha | str = "entropy",
    *,
    method: Method = "uniform",
    normalize_entropy: bool = False,
    alpha_cap: float | None = None,
    alpha_scope: Literal["token", "prefix"] = "token",
    post_softmax: bool = False,
    prefix: bool = True,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Score each candidate answer of each prompt: the sum over its tokens of the combined
    DeCoRe log-prob (``decore``) and of the base model's log-prob (``base``, greedy scoring).

    Answers are tokenised on their own (no special tokens) and appended to the prompt's
    tokens, so give them their leading space (" Paris"). One row per (prompt, answer).
    """
    settings = DecoreSettings(alpha=alpha, normalize_entropy=normalize_entropy, alpha_cap=alpha_cap,  # type: ignore[arg-type]
                              method=method)
    return decore_score_sets(model, prompts, answers, [heads], settings, alpha_scope=alpha_scope,
                             post_softmax=post_softmax, prefix=prefix, batch_size=batch_size)[0]


def decore_score_sets(
    model: LoadedModel,
    prompts: Sequence[str],
    answers: Sequence[Sequence[str]],
    head_sets: Sequence[Sequence[Head]],
    settings: DecoreSettings,
    *,
    alpha_scope: Literal["token", "prefix"] = "token",
    post_softmax: bool = False,
    prefix: bool = True,
    batch_size: int = 16,
) -> list[pd.DataFrame]:
    """``decore_score`` with each head set masked in turn, one frame per set. A pass holds the
    base rows of its (prompt, answer) pairs once and each set's masked rows, at most
    ``2 * batch_size`` rows (what one set's pass holds) unless one pair's rows are more."""
    if alpha_scope not in ("token", "prefix"):
        raise UserError(f"alpha_scope must be 'token' or 'prefix', got {alpha_scope!r}")
    if len(prompts) != len(answers):
        raise UserError(f"{len(prompts)} prompts but {len(answers)} answer lists")
    if batch_size < 1:
        raise UserError("batch_size must be >= 1")
    sets = [check_heads(heads, model) for heads in head_sets]
    pairs = _answer_pairs(model, prompt_rows(model, prompts, prefix), answers)
    records: list[list[dict[str, Any]]] = [[] for _ in sets]
    for chunk in batches(len(pairs), max(1, 2 * batch_size // (1 + len(sets)))):
        sel = [pairs[i] for i in chunk]
        b = len(sel)
        logits = _base_and_masked_logits(model, [p + a for _, _, p, a in sel], sets, settings)
        width = logits.shape[1]
        for j, (pi, ai, _, ans) in enumerate(sel):
            n = len(ans)
            # Position t predicts token t + 1: the answer's logits sit one to the left.
            pos = torch.arange(width - n - 1, width - 1, device=logits.device)
            base = logits[j, pos]
            alpha_t = decore_alpha(base, settings)
            if alpha_scope == "prefix":
                alpha_t = alpha_t[:1].expand_as(alpha_t)
            target = torch.tensor(ans, device=logits.device)[:, None]
            lb = float(torch.log_softmax(base, dim=-1).gather(-1, target).sum())
            for s in range(len(sets)):
                comb = combine(base, logits[(1 + s) * b + j, pos], alpha_t)
                if post_softmax:
                    comb = torch.log_softmax(comb, dim=-1)
                records[s].append({"prompt_index": pi, "answer_index": ai, "answer": answers[pi][ai], "n_tokens": n,
                                   "decore": float(comb.gather(-1, target).sum()), "base": lb,
                                   "alpha_mean": float(alpha_t.mean())})
    return [pd.DataFrame(r).sort_values(["prompt_index", "answer_index"]).reset_index(drop=True) for r in records]


def choices(scored: pd.DataFrame, column: str = "decore") -> list[int]:
    """The chosen answer index per prompt (highest summed score in ``column``)."""
    return [int(g.loc[g[column].idxmax(), "answer_index"]) for _, g in scored.groupby("prompt_index", sort=True)]


__all__ = ["choices", "decore_score", "decore_score_sets"]
