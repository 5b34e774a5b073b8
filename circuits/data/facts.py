"""Facts (subject, relation prompt, object): loading, hashing, answer tokens and the known-facts filter.

The one facts module of circuits/: factual-recall tracing (causal_trace) and the
knowledge-conflict dataset (conflicts) both take their facts from here.

A fact file is JSONL (one object per line) or CSV with the columns described in
``circuits/data/README.md``: ``subject``, ``prompt`` (containing the subject verbatim) and
``answer`` are required; ``relation``, ``type`` and ``id`` are optional. Sources
(:func:`load_facts`): the shipped file (``None``, ``""`` or ``"auto"``), ``"builtin"`` (a small
set of capitals and official languages), or a path.

Answer tokens (:func:`answer_tokens`): the answer continues the prompt, so it is tokenised as
one leading space plus the answer stripped of surrounding whitespace; an answer whose first
token is only whitespace (a bare space before digits, in some tokenizers) is refused, since
that token says nothing about the answer.

Known-facts criterion (stated, per model, never cached):

- ``answer_mode="first"`` (default, as ROME): the model's top-1 next token after the prompt is
  the answer's FIRST token. Multi-token answers are judged on that first token only.
- ``answer_mode="sum"``: every answer token is top-1 under teacher forcing (greedy decoding
  reproduces the whole answer); the score is the SUM of the answer tokens' log-probs.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

from interp.errors import UserError
from interp.model.loaded import LoadedModel

DEFAULT_FACTS = Path(__file__).resolve().parent / "facts.jsonl"
REQUIRED = ("subject", "prompt", "answer")
OPTIONAL = ("relation", "type", "id")
AnswerMode = Literal["first", "sum"]
ANSWER_MODES: tuple[str, ...] = ("first", "sum")
FACT_SOURCES: tuple[str, ...] = ("auto", "builtin")
# The columns a fact's content hash covers (facts_hash); ids are row numbers, not content.
CONTENT = ("subject", "prompt", "answer", "relation", "type")


@dataclass(frozen=True)
class Fact:
    subject: str
    prompt: str
    answer: str
    relation: str = ""
    type: str = ""
    id: str = ""

    @property
    def key(self) -> str:
        return f"{self.relation}:{self.subject}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Japan": "Tokyo", "China": "Beijing",
    "Russia": "Moscow", "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw",
    "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Hungary": "Budapest", "Thailand": "Bangkok", "Kenya": "Nairobi",
    "Peru": "Lima", "Cuba": "Havana", "Iran": "Tehran", "Canada": "Ottawa", "Australia": "Canberra",
    "Argentina": "Buenos Aires", "Belgium": "Brussels", "the Netherlands": "Amsterdam",
    "the Czech Republic": "Prague", "South Korea": "Seoul", "England": "London", "Scotland": "Edinburgh",
    "the Philippines": "Manila", "Chile": "Santiago", "Spain": "Madrid", "Egypt": "Cairo",
}
_LANGUAGES = {
    "France": "French", "Germany": "German", "Italy": "Italian", "Spain": "Spanish", "Japan": "Japanese",
    "Russia": "Russian", "Brazil": "Portuguese", "Greece": "Greek", "Poland": "Polish", "Sweden": "Swedish",
    "the Netherlands": "Dutch", "Turkey": "Turkish", "Egypt": "Arabic", "Norway": "Norwegian",
    "Finland": "Finnish", "Hungary": "Hungarian", "Thailand": "Thai", "Vietnam": "Vietnamese",
    "Iran": "Persian", "Israel": "Hebrew", "Denmark": "Danish", "China": "Chinese",
}
# A small built-in set (capitals and languages), the "builtin" source. Answers whose first
# token is shared with another answer of the same type (New Delhi / New York) are left out on
# purpose: a knowledge conflict between them has no defined logit difference.
BUILTIN_FACTS: tuple[Fact, ...] = tuple(
    [Fact(s, f"The capital of {s} is", a, "capital", "city") for s, a in _CAPITALS.items()]
    + [Fact(s, f"The official language of {s} is", a, "language", "language") for s, a in _LANGUAGES.items()]
)


def _fact_from_row(row: dict[str, object], where: str) -> Fact:
    missing = [c for c in REQUIRED if c not in row]
    if missing:
        raise UserError(f"{where}: missing column {missing[0]!r} (required: {', '.join(REQUIRED)})")
    values = {}
    for col in (*REQUIRED, *OPTIONAL):
        v = row.get(col)
        if v is None:
            v = ""
        if not isinstance(v, str | int | float):
            raise UserError(f"{where}: column {col!r} must be a string, got {type(v).__name__}")
        values[col] = str(v)
    for col in REQUIRED:
        if not values[col].strip():
            raise UserError(f"{where}: column {col!r} is empty")
    if values["subject"] not in values["prompt"]:
        raise UserError(f"{where}: subject {values['subject']!r} does not occur in prompt {values['prompt']!r}")
    return Fact(**values)


def _source_path(source: str | Path | None) -> Path | None:
    """The file of a facts source; None for the built-in set."""
    if source is None or str(source) in ("", "auto"):
        return DEFAULT_FACTS
    return None if str(source) == "builtin" else Path(source)


def load_facts(source: str | Path | None = None) -> list[Fact]:
    """The facts of a source (module docstring), a file's rows validated; facts without an id
    get their row index."""
    p = _source_path(source)
    if p is None:
        return [replace(f, id=str(i)) for i, f in enumerate(BUILTIN_FACTS)]
    if not p.is_file():
        raise UserError(f"fact file not found: {p}")
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise UserError(f"fact file {p.name}: expected a .jsonl or .csv file")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"fact file {p} is empty")
    facts: list[Fact] = []
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{p.name} line {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{p.name} line {n}: expected a JSON object")
            facts.append(_fact_from_row(row, f"{p.name} line {n}"))
    else:
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None:
            raise UserError(f"fact file {p} has no header row")
        for n, row in enumerate(reader, start=2):
            if None in row:
                raise UserError(f"{p.name} line {n}: more fields than header columns")
            facts.append(_fact_from_row(dict(row), f"{p.name} line {n}"))
    if not facts:
        raise UserError(f"fact file {p} has no facts")
    return [f if f.id else Fact(**{**f.to_dict(), "id": str(i)}) for i, f in enumerate(facts)]


# Two hashes, because stored runs carry them as their dataset hash: the tracing detectors name
# their facts by a file (its bytes), the conflict detectors by a source (the facts' content).


def file_hash(source: str | Path | None = None) -> str:
    """The first 16 hex digits of the sha256 of a source's file (of its content for the
    built-in set, which has no file)."""
    p = _source_path(source)
    if p is None:
        return facts_hash("builtin")
    if not p.is_file():
        raise UserError(f"fact file not found: {p}")
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def facts_hash(source: str | Path | None = "auto") -> str:
    """A hash of the content (:data:`CONTENT` columns) of the facts a source resolves to."""
    rows = [{c: getattr(f, c) for c in CONTENT} for f in load_facts(source)]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def answer_tokens(model: LoadedModel, answer: str) -> list[int]:
    """The answer's token ids as a continuation of the prompt (module docstring)."""
    if not answer.strip():
        raise UserError("answer is empty")
    ids = [int(i) for i in model.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]]
    if not ids:
        raise UserError(f"answer {answer!r} tokenises to nothing")
    first = str(model.tokenizer.decode([ids[0]]))
    if not first.strip():
        # A bare-space first token (e.g. before digits) says nothing about the answer.
        raise UserError(f"answer {answer!r}: its first token is only whitespace; give the answer differently")
    return ids


def subject_span(model: LoadedModel, prompt: str, subject: str, prefix: bool = True) -> tuple[list[int], int, int]:
    """Token ids of the prompt and the token range [start, end) covering the subject's LAST
    occurrence in the prompt (as ROME: the subject nearest the prediction)."""
    char_start = prompt.rfind(subject)
    if not subject or char_start < 0:
        raise UserError(f"subject {subject!r} not found in prompt {prompt!r}")
    char_end = char_start + len(subject)
    enc = model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if a < char_end and b > char_start and b > a]
    if not inside:
        raise UserError(f"subject {subject!r} covers no token of prompt {prompt!r}")
    start, end = inside[0], inside[-1] + 1
    if prefix:
        ids = [*model.prefix.ids, *ids]
        start, end = start + len(model.prefix), end + len(model.prefix)
    model.check_length(len(ids))
    return ids, start, end


def _right_padded(rows: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, list[int]]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, [len(r) for r in rows]


def known_facts(
    model: LoadedModel,
    facts: Sequence[Fact],
    answer_mode: AnswerMode = "first",
    batch_size: int = 16,
) -> pd.DataFrame:
    """Which facts the model knows, with the stated criterion (module docstring).

    Prompts are batched right-padded without an attention mask: with causal attention the real
    tokens never see the padding, so every row's logits at its real positions are exact.
    Returns one row per fact: index, id, subject, answer, n_answer_tokens, predicted (top-1
    token text), p_first (probability of the first answer token), logp_answer (log-prob of the first
    answer token, or the sum over all answer tokens with answer_mode="sum"), known.
    """
    if answer_mode not in ANSWER_MODES:
        raise UserError(f"answer_mode must be one of {list(ANSWER_MODES)}, got {answer_mode!r}")
    if not facts:
        raise UserError("no facts given")
    rows, meta = [], []
    for fact in facts:
        ids, _, _ = subject_span(model, fact.prompt, fact.subject)
        ans = answer_tokens(model, fact.answer)
        full = ids + (ans[:-1] if answer_mode == "sum" else [])
        model.check_length(len(full))
        rows.append(full)
        meta.append((len(ids), ans))
    pad_id = model.tokenizer.pad_token_id
    pad = pad_id if isinstance(pad_id, int) else 0
    out = []
    for b0 in range(0, len(rows), batch_size):
        ids, _ = _right_padded(rows[b0 : b0 + batch_size], pad)
        with torch.no_grad():
            logp = torch.log_softmax(model.run(ids).logits.float(), dim=-1)
        for j in range(ids.shape[0]):
            i = b0 + j
            n_prompt, ans = meta[i]
            steps = len(ans) if answer_mode == "sum" else 1
            pos = torch.arange(n_prompt - 1, n_prompt - 1 + steps)
            lp = logp[j, pos]
            target = torch.tensor(ans[:steps], device=lp.device)
            top = lp.argmax(dim=-1)
            fact = facts[i]
            out.append(
                {
                    "index": i,
                    "id": fact.id,
                    "subject": fact.subject,
                    "answer": fact.answer,
                    "n_answer_tokens": len(ans),
                    "predicted": str(model.tokenizer.decode([int(top[0])])),
                    "p_first": float(lp[0, ans[0]].exp()),
                    "logp_answer": float(lp.gather(-1, target[:, None]).sum()),
                    "known": bool((top == target).all()),
                }
            )
    return pd.DataFrame(out)
