"""Clean / corrupt prompt pairs of the circuit tasks, with the answers their metric compares.

Every task gives prompts of one token length and, per prompt, a corrupt prompt of the same
length that differs where the task's information enters, the clean answer's first token and
the answer the corrupt prompt points to (for the logit difference, Wang et al. 2022):

- ``induction``: prefix + x + x[:-1] (x: ``seq_len`` random ordinary tokens), so that the last
  token's previous occurrence is followed by the answer x[-1] (Olsson et al. 2022); corrupt:
  prefix + y + x[:-1] (the first copy replaced by other random tokens; corrupt answer y[-1]).
- ``fact``: a known fact's prompt (the model's top-1 next token is the answer's first token,
  :func:`circuits.data.facts.known_facts`) against the same prompt with the subject replaced by
  another subject of the same relation whose prompt has the same token length and whose answer
  starts with another token (the corrupted subject of Meng et al. 2022, as a clean swap).
- ``needle``: a needle sentence in ``seq_len`` tokens of filler and its question
  (:mod:`circuits.data.needles`) against the same prompt with the answer's tokens in the
  needle replaced by random ordinary tokens (one draw per prompt, seeded). The position is the
  first answer token j the model copies: the prompt followed by the answer's tokens before j
  (teacher-forced, as the retrieval score's fast mode reads them), kept where the model's top-1
  next token there is answer token j; the corrupt answer is the randomised needle's token j.
  Retrieval heads copy at every step of the answer (Wu et al. 2024), and a small model often
  misses the first token yet copies the rest once started.
- ``conflict``: "P c. P" with a counterfactual c (a knowledge conflict, Jin et al. 2024) against
  "P m. P" with the memorised answer m of equal token length; answer c, corrupt answer m, kept
  where the model follows the context (its top-1 is c's first token).

A task the model cannot do (knows no fact, retrieves no needle, follows no context) is a
one-line UserError. Prompts of the fact and conflict tasks are taken from the largest group of
equal token length.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from circuits.data.facts import Fact, answer_tokens, known_facts, load_facts
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.model.tokens import ordinary_token_range

TaskName = Literal["induction", "fact", "needle", "conflict"]
TASKS: tuple[str, ...] = ("induction", "fact", "needle", "conflict")
# Fillers drawn per needle (seeds seed..seed+FILLER_DRAWS-1) to find one prompt length most needles share.
FILLER_DRAWS = 40


@dataclass(frozen=True)
class TaskPairs:
    """Clean and corrupt token ids [n, p], each prompt's answer and corrupt answer (first tokens)."""

    clean: torch.Tensor
    corrupt: torch.Tensor
    answers: tuple[int, ...]
    corrupt_answers: tuple[int, ...]
    labels: tuple[str, ...]  # what each prompt is (a fact's subject, a needle, "random")

    def __post_init__(self) -> None:
        n = int(self.clean.shape[0])
        if self.clean.shape != self.corrupt.shape or not (len(self.answers) == len(self.corrupt_answers) == n):
            raise ValueError("clean, corrupt and answers must have one row per prompt")


def _top1(model: LoadedModel, tokens: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model.run(tokens.to(model.device)).logits[:, -1].argmax(-1).tolist()


def induction_pairs(model: LoadedModel, n: int, seq_len: int, seed: int) -> TaskPairs:
    """Random tokens whose last one's previous occurrence names the answer (module docstring)."""
    model.check_length(len(model.prefix) + 2 * seq_len - 1)
    low, high = ordinary_token_range(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(low, high, (n, seq_len), generator=gen)
    y = torch.randint(low, high, (n, seq_len), generator=gen)
    # y must differ from x where it matters: its last token is the corrupt answer.
    y[:, -1] = torch.where(y[:, -1] == x[:, -1], low + (y[:, -1] + 1 - low) % (high - low), y[:, -1])
    prefix = torch.tensor(model.prefix.ids, dtype=torch.long).expand(n, len(model.prefix))
    clean = torch.cat([prefix, x, x[:, :-1]], dim=1)
    corrupt = torch.cat([prefix, y, x[:, :-1]], dim=1)
    return TaskPairs(clean.to(model.device), corrupt.to(model.device), tuple(x[:, -1].tolist()),
                     tuple(y[:, -1].tolist()), ("random",) * n)


def _largest_group(rows: Sequence[tuple[list[int], list[int], int, int, str]], n: int) -> list[tuple]:
    by_len: dict[int, list[tuple]] = defaultdict(list)
    for r in rows:
        by_len[len(r[0])].append(r)
    best = max(by_len.values(), key=len)
    return best[:n]


def _pairs_of(model: LoadedModel, rows: Sequence[tuple[list[int], list[int], int, int, str]]) -> TaskPairs:
    clean = torch.tensor([r[0] for r in rows], dtype=torch.long, device=model.device)
    corrupt = torch.tensor([r[1] for r in rows], dtype=torch.long, device=model.device)
    return TaskPairs(clean, corrupt, tuple(r[2] for r in rows), tuple(r[3] for r in rows), tuple(r[4] for r in rows))


def fact_pairs(model: LoadedModel, n: int, facts: str = "auto") -> TaskPairs:
    """Known facts against the same prompt with another subject of the relation (module docstring)."""
    pool = load_facts(facts)
    table = known_facts(model, pool, answer_mode="first")
    known = [f for f, k in zip(pool, table["known"], strict=True) if k]
    if not known:
        raise UserError(f"{model.name} knows none of the {len(pool)} facts (top-1 next token = the answer's "
                        f"first token): the fact task needs a fact the model knows")
    by_relation: dict[str, list[Fact]] = defaultdict(list)
    for f in pool:
        by_relation[f.relation].append(f)
    rows = []
    for f in known:
        ids, ans = model.encode(f.prompt), answer_tokens(model, f.answer)[0]
        for other in by_relation[f.relation]:
            if other.subject == f.subject or f.subject not in f.prompt:
                continue
            bad = model.encode(f.prompt.replace(f.subject, other.subject))
            other_ans = answer_tokens(model, other.answer)[0]
            if len(bad) == len(ids) and other_ans != ans:
                rows.append((ids, bad, ans, other_ans, f.subject))
                break
    if not rows:
        raise UserError(f"none of the {len(known)} facts {model.name} knows has another subject of its relation "
                        "with a prompt of equal token length and another answer: no corrupted subject")
    return _pairs_of(model, _largest_group(rows, n))


def needle_pairs(model: LoadedModel, n: int, seq_len: int, seed: int) -> TaskPairs:
    """Needles in filler against the same prompt with the answer's tokens randomised, at the
    first answer token the model copies (module docstring)."""
    from circuits.data.needles import Haystack, NeedleSample, load_haystack, load_needles, make_sample

    haystack = Haystack(model, load_haystack())
    low, high = ordinary_token_range(model)
    gen = torch.Generator().manual_seed(seed)
    # Filler comes in whole sentences, so each needle's prompt length varies with the filler
    # drawn; a batch needs one length: draw fillers until most needles share one.
    drawn: dict[int, dict[int, NeedleSample]] = defaultdict(dict)
    needles = load_needles()
    for i, needle in enumerate(needles):
        for s in range(seed, seed + FILLER_DRAWS):
            sample = make_sample(model, haystack, needle, seq_len, 0.5, seed=s, needle_index=i, prompt_format="plain")
            drawn[len(sample.input_ids)].setdefault(i, sample)
    length = max(drawn, key=lambda n: (len(drawn[n]), -abs(n - seq_len), -n))
    rows = []
    tried = 0
    for i, sample in sorted(drawn[length].items()):
        needle = needles[i]
        ids = list(sample.input_ids)
        tried += 1
        a, b = sample.answer_span
        answer = answer_tokens(model, needle.answer)
        j = _first_copied(model, ids, answer if ids[a:a + len(answer)] == answer else answer[:1])
        if j is None:
            continue
        bad = list(ids)
        bad[a:b] = torch.randint(low, high, (b - a,), generator=gen).tolist()
        if bad[a + j] == answer[j]:
            bad[a + j] = low + (answer[j] + 1 - low) % (high - low)
        forced = answer[:j]
        label = f"needle {i}" + (f" (answer token {j + 1}, {j} teacher-forced)" if j else "")
        rows.append((ids + forced, bad + forced, answer[j], bad[a + j], label))
    if not rows:
        raise UserError(f"{model.name} copies no answer token of the {tried} needles in prompts of {length} tokens (top-1 "
                        "next token = the answer's token, earlier ones given): the needle task needs one it retrieves")
    return _pairs_of(model, _largest_group(rows, n))


def _first_copied(model: LoadedModel, ids: list[int], answer: Sequence[int]) -> int | None:
    """The first j whose answer token is the model's top-1 after ``ids`` + answer[:j]; None if
    none is. ``answer`` is only the first token where the needle does not hold the answer's
    tokens as the question's continuation tokenises them (no aligned later token to corrupt).
    One teacher-forced pass reads every j: attention is causal, so the logits at the position
    before answer token j see exactly ``ids`` + answer[:j]."""
    tokens = torch.tensor([[*ids, *answer[:-1]]], device=model.device)
    with torch.no_grad():
        top = model.run(tokens).logits[0, len(ids) - 1:].argmax(-1).tolist()
    return next((j for j, (t, a) in enumerate(zip(top, answer, strict=True)) if t == a), None)


def conflict_pairs(model: LoadedModel, n: int, facts: str = "auto", seed: int = 0) -> TaskPairs:
    """"P c. P" against "P m. P" where the model follows the context (module docstring)."""
    from circuits.data.conflicts import build_dataset

    data = build_dataset(model, load_facts(facts), seed=seed, require_equal_token_count=True)
    items = [*data.validation, *data.test]
    rows = []
    for it in items:
        clean = model.encode(f"{it.fact_prompt} {it.context_answer}. {it.fact_prompt}")
        bad = model.encode(f"{it.fact_prompt} {it.memory_answer}. {it.fact_prompt}")
        if len(clean) == len(bad):
            rows.append((clean, bad, it.context_token, it.memory_token, it.subject))
    follows = [r for r, top in zip(rows, [_top1(model, torch.tensor([r[0]]))[0] for r in rows], strict=True)
               if top == r[2]]
    if not follows:
        raise UserError(f"{model.name} follows the context in none of {len(rows)} conflict prompts: the conflict "
                        "task needs one where it does")
    random.Random(seed).shuffle(follows)
    return _pairs_of(model, _largest_group(follows, n))


def task_pairs(model: LoadedModel, task: str, n: int, seq_len: int, seed: int, facts: str = "auto") -> TaskPairs:
    """The pairs of a named task (a UserError for an unknown one)."""
    if task == "induction":
        return induction_pairs(model, n, seq_len, seed)
    if task == "fact":
        return fact_pairs(model, n, facts)
    if task == "needle":
        return needle_pairs(model, n, seq_len, seed)
    if task == "conflict":
        return conflict_pairs(model, n, facts, seed)
    raise UserError(f"unknown circuit task {task!r} (known: {', '.join(TASKS)})")


__all__ = ["TASKS", "TaskName", "TaskPairs", "conflict_pairs", "fact_pairs", "induction_pairs", "needle_pairs",
           "task_pairs"]
