"""Tiny randomly initialised models, built in-process (no downloads), for unit tests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from interp.model.loaded import LoadedModel, Provenance

VOCAB = 128


def tiny_tokenizer(
    specials: tuple[str, ...] = ("<bos>", "<eos>", "<pad>", "<unk>"),
    bos: str | None = "<bos>",
    eos: str = "<eos>",
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``specials`` then ``w<i>`` words, VOCAB ids in all.

    The defaults are a plain BOS and no chat template; the prompt-prefix tests also build one
    whose BOS is a chat-turn marker and one without a BOS."""
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(len(specials), VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>" if "<unk>" in vocab else None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos,
        pad_token="<pad>" if "<pad>" in vocab else None, unk_token="<unk>" if "<unk>" in vocab else None,
    )
    if chat_template is not None:
        out.chat_template = chat_template
    return out


# What every tiny model shares: the vocabulary, positions, special ids and eager attention (the
# workbench's hooks need it); the Llama-like families also share their width and head count.
_COMMON: dict[str, Any] = {"vocab_size": VOCAB, "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 1,
                           "attn_implementation": "eager"}
_LLAMA_LIKE: dict[str, Any] = {**_COMMON, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                               "pad_token_id": 2, "tie_word_embeddings": False}


def _sharpened(model: torch.nn.Module, scaled: Callable[[str], bool],
               redrawn: Callable[[str], bool] = lambda name: False) -> torch.nn.Module:
    """Random init is near-uniform attention; larger weights make heads differ, so tests bite:
    the ``scaled`` parameters times 3. The ``redrawn`` ones (initialised at zero by HF, where
    a dropped term would not show) get N(0, 0.5) values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if scaled(name):
                p.mul_(3.0)
            elif redrawn(name):
                p.normal_(0.0, 0.5)
    return model.eval()


def tiny_llama(seed: int = 0, n_layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**_LLAMA_LIKE, num_hidden_layers=n_layers, num_key_value_heads=2, head_dim=16)
    return cast(LlamaForCausalLM, _sharpened(LlamaForCausalLM(cfg), lambda name: "proj" in name))


def tiny_gpt2(seed: int = 0, n_layers: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(**_COMMON, n_embd=64, n_layer=n_layers, n_head=4, n_positions=256)
    return cast(GPT2LMHeadModel, _sharpened(GPT2LMHeadModel(cfg), lambda name: "c_attn" in name or "c_proj" in name))


def tiny_gemma3(seed: int = 0, n_layers: int = 4) -> Gemma3ForCausalLM:
    """Gemma 3 in miniature: sliding-window layers (window 4) and a global one every second
    layer, one kv head, QK-norm, embeddings scaled by sqrt(d_model), RMSNorm as x * (1 + w) and
    the extra post-attention / pre- and post-feedforward norms. Its norms are redrawn: Gemma
    initialises them at w = 0, where x * w and x * (1 + w) differ only by the identity."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        **_LLAMA_LIKE, num_hidden_layers=n_layers, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
    )
    model = _sharpened(Gemma3ForCausalLM(cfg), lambda name: "proj" in name, lambda name: "norm" in name)
    return cast(Gemma3ForCausalLM, model)


def tiny_qwen2(seed: int = 0, n_layers: int = 3) -> Qwen2ForCausalLM:
    """Qwen2 in miniature: 4 query heads on 2 kv heads, with q/k/v biases (redrawn: HF
    initialises them at zero, and a zero bias cannot be dropped visibly)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(**_LLAMA_LIKE, num_hidden_layers=n_layers, num_key_value_heads=2)
    model = _sharpened(Qwen2ForCausalLM(cfg), lambda name: "proj.weight" in name, lambda name: "proj.bias" in name)
    return cast(Qwen2ForCausalLM, model)


def loaded(hf: torch.nn.Module, backend: str = "bridge") -> LoadedModel:
    prov = Provenance(model_id=f"tiny-{type(hf).__name__}", source="object", file_sha256=None, dtype="float32", device="cpu")
    return LoadedModel(hf, tiny_tokenizer(), prov, backend=backend)  # type: ignore[arg-type]


def save_folder(hf: torch.nn.Module, folder: Path) -> Path:
    """Save a tiny model with the tiny tokenizer as a local HF folder (what ``--model`` takes)."""
    hf.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def run_cli(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    """``interp`` in-process: (exit code, stdout, stderr) of one command."""
    from interp.cli import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@contextlib.contextmanager
def no_hooks_left(model: Any) -> Iterator[None]:
    """For tests: assert that a block leaves no forward hooks on the HF modules of ``model``
    (a LoadedModel or anything with its HF module as ``.hf``)."""
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())
    yield
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())
    if after != before:
        raise AssertionError(f"{after - before} hooks left on the model")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread for the block (tiny models gain nothing from a
    second thread, and on a busy machine its spinning costs ten times the work; training stays
    reproducible)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
