"""The prompt prefix: the one token a raw-text prompt starts with.

Models are trained on documents that start after a document separator (``<|endoftext|>``,
``<bos>``, ``<s>``), and many detectors need a first token to act as the attention sink. The
natural choice, the tokenizer's declared BOS, is wrong for some instruct models:
SmolLM2-135M-Instruct declares ``<|im_start|>``, the chat template's turn opener, which the
model expects to be followed by a role name, so raw text after it is off-distribution
(p(" Rome" | "The Colosseum is located in the city of") is 0.75 after ``<|endoftext|>`` and 0.22
after ``<|im_start|>``).

This module is the one place that decides. ``auto`` (the default) takes, in order, the
declaring party's choice (a zoo entry), the tokenizer's BOS, the config's BOS and
``<|endoftext|>`` when the vocabulary has it, and keeps the first that is not a turn or role
marker of the tokenizer's chat template; with none left, prompts get no prefix. A user can
name a token instead, or ``none``. Chat-formatted prompts (retrieval's ``prompt_format=chat``)
are a separate, explicit choice: the chat template writes its own first tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from interp.errors import UserError

AUTO = "auto"
NONE = "none"
DOCUMENT_SEPARATOR = "<|endoftext|>"
PrefixSource = Literal["zoo", "auto", "user", "none"]

# Conversations of one and of three turns: a token the template writes once per turn occurs
# more often in the second (a turn or role marker); a once-per-conversation token such as
# Gemma's {{ bos_token }} does not.
_ONE_TURN = [{"role": "user", "content": "a"}]
_THREE_TURNS = [*_ONE_TURN, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]


@dataclass(frozen=True)
class PromptPrefix:
    """The token that raw-text prompts start with, and how it was chosen.

    Attributes:
        token_id: the token's id, or None for no prefix.
        text: the token's text (``"<|endoftext|>"``), or None for no prefix.
        source: ``zoo`` (declared by the zoo entry), ``auto`` (picked by the rule above),
            ``user`` (named by the caller) or ``none`` (no prefix, by request or for want of a
            token that is not a chat marker).
    """

    token_id: int | None
    text: str | None
    source: PrefixSource

    @property
    def ids(self) -> list[int]:
        """The prefix as a list of token ids to put before a prompt's own (empty for none)."""
        return [] if self.token_id is None else [self.token_id]

    def __len__(self) -> int:
        return len(self.ids)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.token_id is None:
            return f"no prefix ({self.source})"
        return f"{self.text} (id {self.token_id}, {self.source})"


def describe_stored(prefix: Any) -> str:
    """A stored run's prefix (its provenance's ``prefix`` entry) in words; runs made before
    the prefix was recorded say so rather than show today's choice."""
    if not isinstance(prefix, dict) or "source" not in prefix:
        return "unknown (run made before prefixes were recorded)"
    if prefix.get("token_id") is None:
        return f"no prefix ({prefix['source']})"
    return f"{prefix.get('text')} (id {prefix['token_id']}, {prefix['source']})"


def turn_markers(tokenizer: Any, candidates: list[str]) -> set[str]:
    """The candidates that the tokenizer's chat template writes once per turn.

    A template that cannot be rendered is read as text instead: a candidate written literally
    in it counts as a marker (the safe side).
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template or not candidates:
        return set()
    if not isinstance(template, str):  # a dict of named templates
        template = "\n".join(str(t) for t in dict(template).values())
    try:
        one = str(tokenizer.apply_chat_template(_ONE_TURN, tokenize=False))
        three = str(tokenizer.apply_chat_template(_THREE_TURNS, tokenize=False))
    except Exception:  # templates may reject these roles or need variables we do not have
        return {c for c in candidates if c in template}
    return {c for c in candidates if three.count(c) > one.count(c)}


def _token_text(tokenizer: Any, token_id: int) -> str | None:
    text = tokenizer.convert_ids_to_tokens(int(token_id))
    return text if isinstance(text, str) else None


def _token_id(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` when it is one token of the vocabulary, else None."""
    vocab = tokenizer.get_vocab()
    if text in vocab:
        return int(vocab[text])
    return None


def _first(value: Any) -> int | None:
    if isinstance(value, list | tuple):  # some configs list several
        value = value[0] if value else None
    return None if value is None else int(value)


def _auto_candidates(tokenizer: Any, config: Any) -> list[str]:
    texts: list[str] = []
    bos = getattr(tokenizer, "bos_token", None)
    if isinstance(bos, str):
        texts.append(bos)
    text_config = getattr(config, "text_config", None) or config
    config_bos = _first(getattr(text_config, "bos_token_id", None))
    if config_bos is not None and (t := _token_text(tokenizer, config_bos)) is not None:
        texts.append(t)
    texts.append(DOCUMENT_SEPARATOR)
    return [t for t in dict.fromkeys(texts) if _token_id(tokenizer, t) is not None]


def choose_prefix(
    tokenizer: Any, config: Any, request: str | None = AUTO, declared: str | None = None
) -> PromptPrefix:
    """The prefix for a model: ``request`` is ``auto``, ``none`` or a token's text.

    ``declared`` is what a zoo entry names for ``auto``; it must be one token of the vocabulary
    and not a chat marker, like any named token. A named token that is a turn marker is refused:
    chat formatting is a detector's explicit ``prompt_format``, never a raw-text prefix.
    """
    request = AUTO if request is None else str(request)
    if request.strip().lower() == NONE:
        return PromptPrefix(None, None, "none")
    if request.strip().lower() == AUTO:
        if declared is not None:
            return _named(tokenizer, declared, "zoo")
        candidates = _auto_candidates(tokenizer, config)
        markers = turn_markers(tokenizer, candidates)
        for text in candidates:
            if text not in markers:
                return PromptPrefix(_token_id(tokenizer, text), text, "auto")
        return PromptPrefix(None, None, "none")
    return _named(tokenizer, request, "user")


def _named(tokenizer: Any, text: str, source: PrefixSource) -> PromptPrefix:
    token_id = _token_id(tokenizer, text)
    if token_id is None:
        raise UserError(f"prefix {text!r} is not a single token of this tokenizer; give a token, auto or none")
    if text in turn_markers(tokenizer, [text]):
        raise UserError(
            f"prefix {text!r} is a turn marker of this model's chat template; raw-text prompts "
            f"must not start with it (use auto, none or a document separator)"
        )
    return PromptPrefix(token_id, text, source)
