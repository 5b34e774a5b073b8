"""The prompt prefix: which token raw-text prompts start with, and that it travels with results."""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from interp.errors import UserError
from interp.model.loaded import LoadedModel, Provenance
from interp.model.prefix import DOCUMENT_SEPARATOR, PromptPrefix, choose_prefix, turn_markers
from interp.model.tokens import repeated_random_tokens
from interp.model.zoo import ZOO
from interp.runs.registry import UnitResult
from interp.runs.store import Store
from tests.tiny import tiny_tokenizer

TEMPLATES = json.loads((Path(__file__).parent.parent / "data" / "zoo_chat_templates.json").read_text())

# ChatML, as SmolLM2 and Qwen2.5 write it: <|im_start|> opens every turn.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Gemma's shape: the BOS once per conversation, <start_of_turn> per turn.
GEMMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\\n' + m['content'] "
    "+ '<end_of_turn>\\n' }}{% endfor %}"
)


def _config(bos: int | None) -> SimpleNamespace:
    return SimpleNamespace(bos_token_id=bos)


def test_chat_marker_bos_is_replaced_by_the_document_separator() -> None:
    tok = tiny_tokenizer(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<unk>"),
        bos="<|im_start|>", eos="<|im_end|>", chat_template=CHATML,
    )
    assert turn_markers(tok, ["<|im_start|>", "<|im_end|>", DOCUMENT_SEPARATOR]) == {"<|im_start|>", "<|im_end|>"}
    chosen = choose_prefix(tok, _config(1))
    assert chosen == PromptPrefix(0, "<|endoftext|>", "auto")


def test_chat_marker_bos_without_a_separator_gives_no_prefix() -> None:
    tok = tiny_tokenizer(
        specials=("<|im_start|>", "<|im_end|>", "<pad>", "<unk>"),
        bos="<|im_start|>", eos="<|im_end|>", chat_template=CHATML,
    )
    assert choose_prefix(tok, _config(0)) == PromptPrefix(None, None, "none")


def test_no_bos_gives_no_prefix() -> None:
    tok = tiny_tokenizer(specials=("<eos>", "<pad>", "<unk>"), bos=None)
    assert tok.bos_token is None
    assert choose_prefix(tok, _config(None)) == PromptPrefix(None, None, "none")


def test_plain_bos_is_kept_also_when_the_template_writes_it_once() -> None:
    plain = tiny_tokenizer()
    assert choose_prefix(plain, _config(0)) == PromptPrefix(0, "<bos>", "auto")
    specials = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<pad>", "<unk>")
    gemma = tiny_tokenizer(specials=specials, chat_template=GEMMA_LIKE)
    assert turn_markers(gemma, ["<bos>", "<start_of_turn>"]) == {"<start_of_turn>"}
    assert choose_prefix(gemma, _config(0)) == PromptPrefix(0, "<bos>", "auto")


def test_config_bos_is_used_when_the_tokenizer_declares_none() -> None:
    # Qwen2.5: no tokenizer BOS; the config names <|endoftext|>.
    tok = tiny_tokenizer(specials=("<eos>", "<|endoftext|>", "<pad>", "<unk>"), bos=None)
    assert choose_prefix(tok, _config(1)) == PromptPrefix(1, "<|endoftext|>", "auto")


def test_named_none_and_refused_prefixes() -> None:
    tok = tiny_tokenizer(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<unk>"),
        bos="<|im_start|>", eos="<|im_end|>", chat_template=CHATML,
    )
    assert choose_prefix(tok, _config(1), "none") == PromptPrefix(None, None, "none")
    assert choose_prefix(tok, _config(1), "<pad>") == PromptPrefix(3, "<pad>", "user")
    with pytest.raises(UserError, match="turn marker"):
        choose_prefix(tok, _config(1), "<|im_start|>")
    with pytest.raises(UserError, match="not a single token"):
        choose_prefix(tok, _config(1), "<|nope|>")
    with pytest.raises(UserError, match="turn marker"):  # a zoo entry is held to the same rule
        choose_prefix(tok, _config(1), "auto", declared="<|im_start|>")


def _zoo_tokenizer(name: str) -> object:
    entry = TEMPLATES[name]
    specials = dict.fromkeys(
        [t for t in (entry["bos_token"], entry["eos_token"], ZOO[name].prefix) if t]
        + ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<pad>", "<unk>"]
    )
    return tiny_tokenizer(
        specials=tuple(specials), bos=entry["bos_token"], eos=entry["eos_token"],
        chat_template=entry["chat_template"],
    )


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_prefix_is_no_chat_marker(name: str) -> None:
    """Each zoo model's declared prefix, against its own chat template (from its GGUF header):
    never a turn or role marker, and what the rule picks by itself."""
    assert name in TEMPLATES, f"add {name}'s chat template to tests/data/zoo_chat_templates.json"
    tok = _zoo_tokenizer(name)
    prefix = ZOO[name].prefix
    assert prefix is not None
    assert prefix not in turn_markers(tok, [prefix])
    by_rule = choose_prefix(tok, _config(None))
    assert by_rule.text == prefix, (name, by_rule)
    print(f"{name}: raw-text prompts start with {prefix}")


def test_smollm2_declared_bos_is_a_marker() -> None:
    """The control: SmolLM2 declares <|im_start|> as BOS, which its template uses per turn."""
    tok = _zoo_tokenizer("smollm2-135m")
    assert TEMPLATES["smollm2-135m"]["bos_token"] == "<|im_start|>"
    assert turn_markers(tok, ["<|im_start|>"]) == {"<|im_start|>"}


# -- the prefix in tokens, provenance and run keys ------------------------------------------------


def _tiny(tiny_llama_hf: torch.nn.Module, prefix: PromptPrefix | None = None) -> LoadedModel:
    prov = Provenance(model_id="tiny", source="object", file_sha256=None, dtype="float32", device="cpu")
    return LoadedModel(copy.deepcopy(tiny_llama_hf), tiny_tokenizer(), prov, prefix=prefix)


def test_tokens_start_with_the_prefix(tiny_llama_hf: torch.nn.Module) -> None:
    default = _tiny(tiny_llama_hf)
    assert default.prefix == PromptPrefix(0, "<bos>", "auto")
    assert default.to_tokens("w5 w6")[0].tolist() == [0, 5, 6]
    other = _tiny(tiny_llama_hf, PromptPrefix(2, "<pad>", "user"))
    assert other.to_tokens("w5 w6")[0].tolist() == [2, 5, 6]
    assert repeated_random_tokens(other, 2, 4, seed=0)[:, 0].tolist() == [2, 2]
    bare = _tiny(tiny_llama_hf, PromptPrefix(None, None, "none"))
    assert bare.to_tokens("w5 w6")[0].tolist() == [5, 6]
    assert repeated_random_tokens(bare, 2, 4, seed=0).shape == (2, 8)
    assert other.provenance.prefix == {"token_id": 2, "text": "<pad>", "source": "user"}


def _start(store: Store, provenance: dict) -> int:
    return store.start_run(
        model="tiny", model_hash="h", detector="induction", variant="default", params={"n": 1},
        dataset_hash=None, seed=0, code_version="test", provenance=provenance,
    ).id


def test_runs_with_other_prefixes_never_resume_into_each_other(tmp_path: Path) -> None:
    store = Store(tmp_path)
    eot = {"token_id": 0, "text": "<|endoftext|>", "source": "zoo"}
    chat = {"token_id": 1, "text": "<|im_start|>", "source": "user"}
    first = _start(store, {"prefix": eot})
    assert _start(store, {"prefix": eot}) == first  # same prefix: resumes
    assert _start(store, {"prefix": chat}) != first
    assert _start(store, {}) != first


def test_a_store_written_before_prefixes_opens_and_says_unknown(tmp_path: Path) -> None:
    """A run row as the previous release wrote it (provenance without a prefix, key without
    one): the store opens, the run shows an unknown prefix, and a new run does not resume it."""
    with Store(tmp_path) as store:
        old = store.start_run(
            model="tiny", model_hash="h", detector="induction", variant="default", params={"n": 1},
            dataset_hash=None, seed=0, code_version="0.1.0", provenance={"model_id": "tiny"},
        )
        old.commit_unit("u0", UnitResult(), 0.0)
    # The previous release's key had no prefix entry: rewrite it as that release computed it.
    import hashlib

    legacy = hashlib.sha256(json.dumps(["h", "induction", "default", {"n": 1}, None, 0],
                                       sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    con = sqlite3.connect(tmp_path / "results.db")
    con.execute("UPDATE runs SET key = ?, status = 'interrupted'", (legacy,))
    con.commit()
    con.close()
    with Store(tmp_path) as store:
        runs = store.runs()
        assert runs.loc[0, "prefix"].startswith("unknown")
        new = _start(store, {"prefix": {"token_id": 0, "text": "<bos>", "source": "auto"}})
        assert new != old.id
        assert store.runs().set_index("id").loc[new, "prefix"] == "<bos> (id 0, auto)"
