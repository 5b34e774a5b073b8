"""Knowledge-conflict dataset (Jin et al. 2024, "Cutting Off the Head Ends the Conflict", ACL Findings).

A fact the model knows ("The capital of France is" -> Paris) is contradicted by a context
sentence that states a same-type substitute ("The capital of France is Rome."), and the fact
is asked again, in one of these formats:

- ``restated``: "The capital of France is Rome. The capital of France is"
- ``qa``:       "The capital of France is Rome. Q: What is the capital of France? A:"

Memory answer = the model's own top-1 answer to the fact prompt without context; only facts
where that equals the dataset's answer are kept (the model "knows" them: ``known_facts`` of
circuits/facts.py, criterion ``first``). Context answer = the
answer of another fact of the same ``type`` (another capital, another language).

Answers are compared by their FIRST token (with a leading space): an item whose memory and
context answers have different token counts (" Paris" vs " Buenos Aires") is kept and scored
on first tokens, and flagged ``equal_token_count=False``; pass ``require_equal_token_count``
to reject such items instead. Two answers with the same first token cannot be told apart by
a logit difference, so that is an error, as is a context answer equal to the memory answer.

The no-conflict prompt of an item is the same question without the counterfactual sentence
("The capital of France is" / "Q: What is the capital of France? A:"); it ends in the same
tokens as the conflict prompt, so the two runs are aligned at their final positions.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
import torch

from circuits.data.facts import Fact, answer_tokens, known_facts, load_facts
from interp.errors import UserError
from interp.model.interventions import Intervention
from interp.model.loaded import LoadedModel
from interp.runs.config import SEED_MAX, DetectorConfig, param
from interp.stats import Interval, mean_interval, wilson

Format = Literal["restated", "qa"]
FORMATS: tuple[str, ...] = get_args(Format)
Split = Literal["validation", "test"]

# Questions for the "qa" format, keyed by relation. Facts of other relations get the generic
# question "<prompt> what?" ("The capital of France is what?"), which stays grammatical for
# prompts that end in a copula.
QUESTIONS: dict[str, str] = {
    "capital": "What is the capital of {subject}?",
    "language": "What is the official language of {subject}?",
    "official_language": "What is the official language of {subject}?",
    "currency": "What is the currency of {subject}?",
    "continent": "On which continent is {subject}?",
    "city_country": "In which country is {subject}?",
    "landmark_country": "In which country is {subject}?",
    "landmark_city": "In which city is {subject}?",
    "birth_country": "In which country was {subject} born?",
    "native_language": "What is the mother tongue of {subject}?",
    "sport": "Which sport does {subject} play?",
    "product_maker": "Which company makes {subject}?",
    "founder": "Who founded {subject}?",
}


def question(fact_prompt: str, subject: str, relation: str) -> str:
    template = QUESTIONS.get(relation)
    return template.format(subject=subject) if template else f"{fact_prompt} what?"


@dataclass(frozen=True)
class ConflictItem:
    """One knowledge conflict: a known fact and a same-type counterfactual answer."""

    id: str
    subject: str
    relation: str
    type: str
    fact_prompt: str
    memory_answer: str
    context_answer: str
    memory_token: int
    context_token: int
    memory_n_tokens: int
    context_n_tokens: int

    @property
    def equal_token_count(self) -> bool:
        return self.memory_n_tokens == self.context_n_tokens

    @property
    def question(self) -> str:
        return question(self.fact_prompt, self.subject, self.relation)

    def context_sentence(self) -> str:
        return f"{self.fact_prompt} {self.context_answer}."

    def plain_prompt(self, fmt: str) -> str:
        """The no-conflict prompt: the same query without the counterfactual sentence."""
        check_format(fmt)
        return self.fact_prompt if fmt == "restated" else f"Q: {self.question} A:"

    def conflict_prompt(self, fmt: str) -> str:
        return f"{self.context_sentence()} {self.plain_prompt(fmt)}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown conflict format {fmt!r} (known: {', '.join(FORMATS)})")


def make_item(
    model: LoadedModel,
    fact: Fact,
    context_answer: str,
    *,
    require_equal_token_count: bool = False,
) -> ConflictItem:
    """A conflict item for a fact, with clear errors for answers that cannot be compared."""
    mem, ctx = fact.answer.strip(), context_answer.strip()
    if mem.lower() == ctx.lower():
        raise UserError(f"context answer {ctx!r} equals the memory answer for {fact.subject!r}: no conflict")
    mem_ids, ctx_ids = answer_tokens(model, mem), answer_tokens(model, ctx)
    if mem_ids[0] == ctx_ids[0]:
        raise UserError(
            f"memory answer {mem!r} and context answer {ctx!r} share their first token; "
            "the logit difference is undefined"
        )
    if require_equal_token_count and len(mem_ids) != len(ctx_ids):
        raise UserError(
            f"memory answer {mem!r} has {len(mem_ids)} tokens, context answer {ctx!r} has {len(ctx_ids)}"
        )
    return ConflictItem(
        id=f"{fact.key}->{ctx}",
        subject=fact.subject,
        relation=fact.relation,
        type=fact.type,
        fact_prompt=fact.prompt,
        memory_answer=mem,
        context_answer=ctx,
        memory_token=mem_ids[0],
        context_token=ctx_ids[0],
        memory_n_tokens=len(mem_ids),
        context_n_tokens=len(ctx_ids),
    )


@dataclass
class ConflictDataset:
    """Known-fact conflict items, split into validation and test by a seed."""

    validation: list[ConflictItem]
    test: list[ConflictItem]
    seed: int
    n_facts: int
    n_known: int
    skipped: dict[str, int] = field(default_factory=dict)

    def split(self, name: str) -> list[ConflictItem]:
        if name == "validation":
            items = self.validation
        elif name == "test":
            items = self.test
        elif name == "all":
            items = self.validation + self.test
        else:
            raise UserError(f"unknown split {name!r} (validation, test, all)")
        if not items:
            raise UserError(f"the {name} split is empty")
        return items

    def split_record(self) -> dict[str, Any]:
        """The split as stored with a run: seed, item ids and a hash of both."""
        rec = {
            "seed": self.seed,
            "validation": [i.id for i in self.validation],
            "test": [i.id for i in self.test],
        }
        rec["hash"] = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]
        rec["n_facts"] = self.n_facts
        rec["n_known"] = self.n_known
        rec["skipped"] = dict(self.skipped)
        return rec


def grouped_by_length(
    model: LoadedModel, prompts: Sequence[str], batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Batches of prompts of equal token length (after the prompt prefix), so no padding is ever needed.

    Yields (indices into ``prompts``, token ids [b, p]) in a deterministic order.
    """
    if batch_size < 1:
        raise UserError("batch_size must be >= 1")
    by_len: dict[int, list[tuple[int, list[int]]]] = {}
    for i, p in enumerate(prompts):
        ids = model.to_tokens(p)[0].tolist()
        by_len.setdefault(len(ids), []).append((i, ids))
    for length in sorted(by_len):
        group = by_len[length]
        for s in range(0, len(group), batch_size):
            chunk = group[s : s + batch_size]
            yield [i for i, _ in chunk], torch.tensor([ids for _, ids in chunk], device=model.device)


def last_token_predictions(
    model: LoadedModel,
    prompts: Sequence[str],
    tokens: Sequence[Sequence[int]],
    interventions: Sequence[Intervention] = (),
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 token and the logits of the given tokens at the last position of each prompt.

    Returns (top1 [n], logits [n, len(tokens[i])]); ``tokens[i]`` lists the ids to read for
    prompt i (all rows must list the same number of ids).
    """
    n = len(prompts)
    width = len(tokens[0]) if n else 0
    top1 = torch.empty(n, dtype=torch.long)
    picked = torch.empty(n, width)
    for idx, ids in grouped_by_length(model, prompts, batch_size):
        with torch.no_grad():
            logits = model.run(ids, interventions=interventions).logits[:, -1].float().cpu()
        top1[idx] = logits.argmax(-1)
        picked[idx] = torch.stack([logits[j, list(tokens[i])] for j, i in enumerate(idx)])
    return top1, picked


def _typed(fact: Fact) -> Fact:
    """A fact with a type: substitutes are drawn among answers of one type, and the relation is
    the next best grouping (the answers of one relation share a type)."""
    fact = fact if fact.type else replace(fact, type=fact.relation)
    missing = [c for c in ("relation", "type") if not getattr(fact, c)]
    if missing:
        raise UserError(f"fact {fact.subject!r} -> {fact.answer!r} lacks {missing[0]!r}: conflict items need a relation")
    return fact


def _conflict_items(
    model: LoadedModel, facts: Sequence[Fact], known: Sequence[Fact], rng: random.Random, equal_tokens: bool
) -> tuple[list[ConflictItem], dict[str, int]]:
    """One conflict item per known fact, its context answer drawn (with ``rng``) from the answers
    of the facts of its type whose first token differs from the memory answer's, preferring the
    memory answer's token count; the facts without such an answer counted as skipped."""
    pool: dict[str, list[str]] = {}
    for f in facts:
        names = pool.setdefault(f.type, [])
        if f.answer.strip() not in names:
            names.append(f.answer.strip())
    tok_cache: dict[str, list[int]] = {}

    def toks(a: str) -> list[int]:
        if a not in tok_cache:
            tok_cache[a] = answer_tokens(model, a)
        return tok_cache[a]

    items: list[ConflictItem] = []
    skipped = {"no_substitute": 0}
    for f in sorted(known, key=lambda x: x.key):
        mem = toks(f.answer)
        cands = [a for a in pool[f.type] if a.lower() != f.answer.strip().lower() and toks(a)[0] != mem[0]]
        same_len = [a for a in cands if len(toks(a)) == len(mem)]
        if equal_tokens:
            cands = same_len
        if not cands:
            skipped["no_substitute"] += 1
            continue
        ctx = rng.choice(same_len or cands)
        items.append(make_item(model, f, ctx, require_equal_token_count=equal_tokens))
    return items, skipped


def build_dataset(
    model: LoadedModel,
    facts: Sequence[Fact] | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.5,
    max_items: int = 0,
    require_equal_token_count: bool = False,
    batch_size: int = 32,
) -> ConflictDataset:
    """Known facts -> conflict items with seeded context answers -> seeded validation/test split.

    The context answer of a fact is drawn (seeded) from the answers of all facts of the same
    type whose first token differs from the memory answer's, preferring answers with the
    memory answer's token count. ``max_items`` > 0 keeps a seeded subset of that many items.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    facts = [_typed(f) for f in (load_facts() if facts is None else facts)]
    # One fact per key (relation, subject): the first one listed.
    uniq: dict[str, Fact] = {}
    for f in facts:
        uniq.setdefault(f.key, f)
    candidates = list(uniq.values())
    if not candidates:
        raise UserError("no facts given")
    table = known_facts(model, candidates, answer_mode="first", batch_size=batch_size)
    known = [f for f, k in zip(candidates, table["known"], strict=True) if k]
    rng = random.Random(seed)
    items, skipped = _conflict_items(model, facts, known, rng, require_equal_token_count)
    rng.shuffle(items)
    if max_items > 0:
        items = items[:max_items]
    n_val = round(len(items) * val_fraction)
    val, test = items[:n_val], items[n_val:]
    if not val or not test:
        raise UserError(
            f"only {len(items)} known conflict items ({len(known)} of {len(facts)} facts known): "
            "a validation/test split needs items on both sides"
        )
    return ConflictDataset(
        validation=sorted(val, key=lambda i: i.id),
        test=sorted(test, key=lambda i: i.id),
        seed=seed,
        n_facts=len(facts),
        n_known=len(known),
        skipped=skipped,
    )


def score_items(
    model: LoadedModel,
    items: Sequence[ConflictItem],
    fmt: str,
    interventions: Sequence[Intervention] = (),
    *,
    conflict: bool = True,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Per item: top-1 token, logit(memory), logit(context) at the last position.

    ``conflict=False`` scores the no-conflict prompt (plain factual recall in that format).
    """
    check_format(fmt)
    if not items:
        raise UserError("no conflict items to score")
    prompts = [i.conflict_prompt(fmt) if conflict else i.plain_prompt(fmt) for i in items]
    toks = [[i.memory_token, i.context_token] for i in items]
    top1, logits = last_token_predictions(model, prompts, toks, interventions, batch_size)
    return scored_frame(items, fmt, top1, logits)


def scored_frame(items: Sequence[ConflictItem], fmt: str, top1: torch.Tensor, logits: torch.Tensor) -> pd.DataFrame:
    """:func:`score_items`' table from each item's top-1 token and its [memory, context] logits."""
    return pd.DataFrame(
        {
            "item": [i.id for i in items],
            "format": fmt,
            "top1": top1.tolist(),
            "logit_memory": logits[:, 0].tolist(),
            "logit_context": logits[:, 1].tolist(),
            "memory_token": [i.memory_token for i in items],
            "context_token": [i.context_token for i in items],
        }
    )


def rates(scored: pd.DataFrame) -> dict[str, float]:
    """Memory / context rate (top-1 equals that answer's first token), the rate of neither,
    the rate where memory outscores context, and the mean logit(memory) - logit(context)."""
    return {**{name: iv.value for name, iv in rate_intervals(scored).items()}, "n": len(scored)}


# How each of :func:`rates`' means gets its interval: a rate is a mean of 0/1 outcomes per item
# (Wilson), the logit difference a mean of real values per item (t).
RATE_INTERVALS: dict[str, str] = {
    "memory_rate": "wilson", "context_rate": "wilson", "other_rate": "wilson",
    "memory_preferred_rate": "wilson", "mean_logit_diff": "t",
}


def rate_outcomes(scored: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each rate of :func:`rates` as the per-item 0/1 outcomes it is the mean of, in the frame's
    item order (so two head sets scored on the same items can be compared item by item)."""
    top1 = scored["top1"].to_numpy()
    mem = top1 == scored["memory_token"].to_numpy()
    ctx = top1 == scored["context_token"].to_numpy()
    diff = scored["logit_memory"].to_numpy(dtype=float) - scored["logit_context"].to_numpy(dtype=float)
    outcomes = {"memory_rate": mem, "context_rate": ctx, "other_rate": ~mem & ~ctx, "memory_preferred_rate": diff > 0}
    return {name: x.astype(float) for name, x in outcomes.items()}


def rate_intervals(scored: pd.DataFrame, level: float = 0.95) -> dict[str, Interval]:
    """Each of :func:`rates`' means over the items with its interval and n (Wilson for the
    rates, a t interval for the mean logit difference)."""
    if scored.empty:
        raise UserError("no scored items")
    out = {name: wilson(x, level) for name, x in rate_outcomes(scored).items()}
    diff = scored["logit_memory"].to_numpy(dtype=float) - scored["logit_context"].to_numpy(dtype=float)
    out["mean_logit_diff"] = mean_interval(diff, level)
    return out


def rates_table(model: LoadedModel, dataset: ConflictDataset, formats: Sequence[str]) -> pd.DataFrame:
    """Rates per format and split, as a tidy table (notebooks and reports)."""
    rows = []
    for fmt in formats:
        for split in ("validation", "test"):
            r = rates(score_items(model, dataset.split(split), fmt))
            rows.append({"format": fmt, "split": split, **r})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the detectors' shared parameters


@dataclass(frozen=True)
class ConflictConfig(DetectorConfig):
    """The dataset parameters every conflict detector takes (conflict-heads, ph3), declared once.

    ph3 redeclares ``seed`` with its own help (it also seeds the random-head control there); a
    redeclared dataclass field keeps its place, so the options stay in this order.
    """

    seed: int = param(0, "seed of the context answers and of the validation/test split", low=0, high=SEED_MAX)
    formats: tuple[Format, ...] = param(FORMATS, "comma-separated prompt formats (restated, qa)")
    # circuits.data.facts.FACT_SOURCES spelled out: a field's choices are a Literal.
    facts: Literal["auto", "builtin"] = param("auto", "facts source: auto (the shipped facts file) or builtin")
    val_fraction: float = param(0.5, "fraction of items in the validation split", low=0, high=1,
                                low_open=True, high_open=True)
    max_items: int = param(80, "keep a seeded subset of this many known items (0 = all)", low=0)

    def check(self) -> None:
        super().check()
        if not self.formats:
            raise UserError("no conflict format given in formats (known: restated, qa)")
        twice = sorted({f for f in self.formats if self.formats.count(f) > 1})
        if twice:
            raise UserError(f"formats lists {twice[0]!r} twice")


def conflict_dataset(model: LoadedModel, cfg: ConflictConfig, batch_size: int) -> ConflictDataset:
    """The dataset a conflict detector's config describes (its facts, seed, split, subset)."""
    return build_dataset(
        model,
        load_facts(cfg.facts),
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        max_items=cfg.max_items,
        batch_size=batch_size,
    )


def example_tokens(model: LoadedModel, cfg: ConflictConfig) -> torch.Tensor | None:
    """Token ids of one conflict prompt in the config's first format: the first listed fact
    that has a same-type substitute, without the known-facts filter (a typical input for the
    dashboard's attention view, not a scored item). None when no fact has one."""
    typed = [_typed(f) for f in load_facts(cfg.facts)]
    for fact in typed:
        mem = fact.answer.strip()
        first = answer_tokens(model, mem)[0]
        for other in typed:
            ctx = other.answer.strip()
            if other.type != fact.type or ctx.lower() == mem.lower():
                continue
            if answer_tokens(model, ctx)[0] != first:
                return model.to_tokens(make_item(model, fact, ctx).conflict_prompt(cfg.formats[0]))
    return None
