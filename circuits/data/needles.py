"""Needle-in-a-haystack prompts, generated offline and seeded (Wu et al. 2024).

A needle is a (sentence, question, answer) triple. The sentence is inserted into filler prose
(``data/haystack.txt``, public domain, see ``data/HAYSTACK_SOURCE.md``) at a sentence
boundary, at a relative depth (0 = before the first filler sentence, 1 = after the last), in a
context of about ``length`` tokens (filler + needle). The prompt follows the reference code:

    This is a very long story book: <book> {context} </book>.
    Based on the content of the book, Question: {question}
    Answer:

For a tokenizer with a chat template (instruction-tuned models, as the reference does for its
chat models) that text is the user message and the assistant header follows it; otherwise the prompt prefix
+ the text. Each sample records the token span of the needle sentence in the prompt.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from interp.errors import UserError

if TYPE_CHECKING:
    from interp.model.loaded import LoadedModel

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_HAYSTACK = DATA_DIR / "haystack.txt"
DEFAULT_NEEDLES = DATA_DIR / "needles.jsonl"
TEMPLATE = (
    "This is a very long story book: <book> {context} </book>.\n"
    "Based on the content of the book, Question: {question}\nAnswer:"
)
PromptFormat = Literal["auto", "chat", "plain"]

# A sentence ends at . ! ? (optionally followed by one closing quote or bracket) before
# whitespace and a capital, a digit or an opening quote.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+(?=[\"'“‘(\[A-Z0-9])")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words: the unit of ROUGE-1 and of the answer check."""
    return re.findall(r"[a-z0-9]+", text.lower())


@dataclass(frozen=True)
class Needle:
    sentence: str
    question: str
    answer: str

    def check(self, where: str) -> None:
        for name in ("sentence", "question", "answer"):
            if not getattr(self, name).strip():
                raise UserError(f"{where}: needle field {name!r} is empty")
        s, a = words(self.sentence), words(self.answer)
        if not a or not any(s[i : i + len(a)] == a for i in range(len(s) - len(a) + 1)):
            raise UserError(
                f"{where}: the answer {self.answer!r} does not appear in the needle sentence {self.sentence!r}"
            )
        if " ".join(a) in " ".join(words(self.question)):
            raise UserError(f"{where}: the answer {self.answer!r} is given away by the question")


def load_needles(path: str | Path | None = None) -> list[Needle]:
    """Read needles from a JSONL file (one {"sentence", "question", "answer"} object a line)."""
    p = Path(path) if path else DEFAULT_NEEDLES
    if not p.is_file():
        raise UserError(f"needles file not found: {p}")
    out: list[Needle] = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p.name} line {i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not {"sentence", "question", "answer"} <= set(obj):
            raise UserError(f"{where}: expected an object with keys 'sentence', 'question', 'answer'")
        needle = Needle(str(obj["sentence"]).strip(), str(obj["question"]).strip(), str(obj["answer"]).strip())
        needle.check(where)
        out.append(needle)
    if not out:
        raise UserError(f"needles file {p} holds no needles")
    return out


def split_sentences(text: str) -> list[str]:
    flat = " ".join(text.split())
    return [s.strip() for s in _SENTENCE_END.split(flat) if s.strip()]


def load_haystack(path: str | Path | None = None) -> list[str]:
    """The filler text of a file, as a list of sentences."""
    p = Path(path) if path else DEFAULT_HAYSTACK
    if not p.is_file():
        raise UserError(f"haystack file not found: {p}")
    sentences = split_sentences(p.read_text(encoding="utf-8", errors="replace"))
    if not sentences:
        raise UserError(f"haystack file {p} is empty")
    return sentences


@dataclass(frozen=True)
class NeedleSample:
    """One prompt: its tokens, where the needle sentence sits, and what produced it."""

    needle_index: int
    needle: Needle
    length: int  # requested context length (filler + needle), tokens
    depth: float  # requested relative depth, 0..1
    input_ids: tuple[int, ...]
    needle_span: tuple[int, int]  # token positions [start, end) of the needle sentence
    answer_span: tuple[int, int]  # token positions [start, end) of the answer inside it
    context_tokens: int  # actual tokens of the context (filler + needle)
    actual_depth: float  # filler tokens before the needle / all filler tokens
    prompt_format: str

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("input_ids")
        d["needle"] = asdict(self.needle)
        d["n_tokens"] = self.n_tokens
        return d


def use_chat(model: LoadedModel, prompt_format: PromptFormat | str) -> bool:
    has_template = bool(getattr(model.tokenizer, "chat_template", None))
    if prompt_format == "chat" and not has_template:
        raise UserError(f"{model.name}'s tokenizer has no chat template; use prompt_format=plain")
    if prompt_format not in ("auto", "chat", "plain"):
        raise UserError(f"prompt_format must be auto, chat or plain, got {prompt_format!r}")
    return prompt_format == "chat" or (prompt_format == "auto" and has_template)


def _prompt_text(model: LoadedModel, context: str, question: str, chat: bool) -> tuple[str, bool]:
    """The prompt text and whether the prompt prefix goes before its tokens (raw text only:
    a chat template writes its own first tokens)."""
    body = TEMPLATE.format(context=context, question=question)
    if chat:
        text = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
        return str(text), False
    return body, True


def _encode(model: LoadedModel, text: str, prefix: bool) -> tuple[list[int], list[tuple[int, int]]]:
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    if prefix:
        ids = [*model.prefix.ids, *ids]
        offsets = [(0, 0)] * len(model.prefix) + offsets
    return ids, offsets


def _char_span_to_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hit:
        raise UserError("could not locate the needle in the tokenised prompt")
    return hit[0], hit[-1] + 1


class Haystack:
    """Sentences of filler with their token counts, for assembling contexts of a given length."""

    def __init__(self, model: LoadedModel, sentences: Sequence[str]) -> None:
        if not sentences:
            raise UserError("the haystack is empty")
        self.model = model
        self.sentences = list(sentences)
        self.counts = [self.count(" " + s) for s in self.sentences]

    def count(self, text: str) -> int:
        return len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])

    def window(self, n_tokens: int, rng: random.Random) -> list[str]:
        """Consecutive sentences (wrapping around) from a seeded start, up to ``n_tokens``."""
        start = rng.randrange(len(self.sentences))
        out: list[str] = []
        total = 0
        i = start
        while True:
            c = self.counts[i % len(self.sentences)]
            if total + c > n_tokens:
                break
            out.append(self.sentences[i % len(self.sentences)])
            total += c
            i += 1
        return out


def overhead_tokens(model: LoadedModel, needle: Needle, prompt_format: PromptFormat | str = "auto") -> int:
    """Tokens of the prompt outside the context (template, question, chat header, prompt prefix)."""
    chat = use_chat(model, prompt_format)
    text, prefix = _prompt_text(model, "", needle.question, chat)
    return len(_encode(model, text, prefix)[0])


def make_sample(
    model: LoadedModel,
    haystack: Haystack,
    needle: Needle,
    length: int,
    depth: float,
    *,
    seed: int = 0,
    needle_index: int = 0,
    prompt_format: PromptFormat | str = "auto",
) -> NeedleSample:
    """One prompt: filler of about ``length`` tokens with the needle at ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"depth must lie in [0, 1], got {depth}")
    chat = use_chat(model, prompt_format)
    needle_tokens = haystack.count(" " + needle.sentence)
    if needle_tokens > length:
        raise UserError(
            f"needle {needle_index} is {needle_tokens} tokens, longer than the context length {length}"
        )
    # str seeds hash deterministically (sha512), unlike hash() of a tuple across processes.
    rng = random.Random(f"{seed}/{needle_index}/{length}/{depth:.6f}")
    filler = haystack.window(length - needle_tokens, rng)
    counts = [haystack.count(" " + s) for s in filler]
    total = sum(counts)
    # The sentence boundary whose token offset is closest to depth * filler tokens.
    cum = np.concatenate([[0], np.cumsum(counts)]) if counts else np.array([0])
    cut = int(np.argmin(np.abs(cum - depth * total)))
    before, after = filler[:cut], filler[cut:]
    context = " ".join([*before, needle.sentence, *after])
    text, prefix = _prompt_text(model, context, needle.question, chat)
    ctx_at = text.index(context)
    n_start = ctx_at + (len(" ".join(before)) + 1 if before else 0)
    n_end = n_start + len(needle.sentence)
    assert text[n_start:n_end] == needle.sentence
    ids, offsets = _encode(model, text, prefix)
    span = _char_span_to_tokens(offsets, n_start, n_end)
    a_rel = _find_answer(needle)
    a_span = _char_span_to_tokens(offsets, n_start + a_rel[0], n_start + a_rel[1])
    ctx_span = _char_span_to_tokens(offsets, ctx_at, ctx_at + len(context))
    return NeedleSample(
        needle_index=needle_index,
        needle=needle,
        length=length,
        depth=float(depth),
        input_ids=tuple(ids),
        needle_span=span,
        answer_span=a_span,
        context_tokens=ctx_span[1] - ctx_span[0],
        actual_depth=float(cum[cut] / total) if total else 0.0,
        prompt_format="chat" if chat else "plain",
    )


def _find_answer(needle: Needle) -> tuple[int, int]:
    """Character span of the answer in the sentence (case-insensitive; checked at load time)."""
    i = needle.sentence.lower().find(needle.answer.lower())
    if i >= 0:
        return i, i + len(needle.answer)
    # The answer matched word-wise only (punctuation differs): span its first to last word.
    a = words(needle.answer)
    spans = [(m.start(), m.end()) for m in re.finditer(r"[A-Za-z0-9]+", needle.sentence)]
    low = [needle.sentence[s:e].lower() for s, e in spans]
    for j in range(len(low) - len(a) + 1):
        if low[j : j + len(a)] == a:
            return spans[j][0], spans[j + len(a) - 1][1]
    raise UserError(f"the answer {needle.answer!r} does not appear in {needle.sentence!r}")


def token_bound(model: LoadedModel, budget: int, max_new_tokens: int) -> int:
    """Most prompt tokens allowed: the model's window and the budget, less room to decode."""
    return min(model.info.max_positions, budget) - max_new_tokens


def grid_lengths(min_length: int, max_length: int, n: int) -> list[int]:
    if n < 1 or min_length < 1 or max_length < min_length:
        raise UserError(
            f"need 1 <= min_length <= max_length and n_lengths >= 1 (got {min_length}, {max_length}, {n})"
        )
    return sorted({round(float(x)) for x in np.linspace(min_length, max_length, n)})


def grid_depths(n: int) -> list[float]:
    if n < 1:
        raise UserError(f"n_depths must be >= 1, got {n}")
    return [0.5] if n == 1 else [float(x) for x in np.linspace(0.0, 1.0, n)]


def make_grid(
    model: LoadedModel,
    needles: Sequence[Needle],
    haystack: Haystack,
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    budget: int,
    max_new_tokens: int,
    seed: int = 0,
    prompt_format: PromptFormat | str = "auto",
) -> list[NeedleSample]:
    """All (length, depth, needle) samples; every prompt fits the window and the budget."""
    bound = token_bound(model, budget, max_new_tokens)
    check_fits(model, needles, lengths, bound, prompt_format, haystack)
    out = []
    for length in lengths:
        for depth in depths:
            for i, needle in enumerate(needles):
                s = make_sample(
                    model, haystack, needle, length, depth, seed=seed, needle_index=i, prompt_format=prompt_format
                )
                if s.n_tokens > bound:
                    raise UserError(
                        f"a prompt of {s.n_tokens} tokens exceeds the bound of {bound} "
                        f"(budget/context less {max_new_tokens} tokens to decode); lower max_length"
                    )
                out.append(s)
    return out


def check_fits(
    model: LoadedModel,
    needles: Sequence[Needle],
    lengths: Sequence[int],
    bound: int,
    prompt_format: PromptFormat | str,
    haystack: Haystack,
) -> None:
    """Clear errors before any work: a needle or a length that cannot fit the token bound."""
    if bound < 1:
        raise UserError(f"the token budget leaves no room for a prompt (bound {bound})")
    for i, needle in enumerate(needles):
        need = haystack.count(" " + needle.sentence) + overhead_tokens(model, needle, prompt_format)
        if need > bound:
            raise UserError(
                f"needle {i} needs {need} tokens with its question, more than the budget allows ({bound})"
            )
        for length in lengths:
            if length + overhead_tokens(model, needle, prompt_format) > bound:
                raise UserError(
                    f"context length {length} plus the question ({overhead_tokens(model, needle, prompt_format)} "
                    f"tokens) exceeds the bound of {bound} tokens (model window / max_tokens budget less decoding)"
                )
