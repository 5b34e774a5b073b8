"""The prompt prefix on the zoo default: <|endoftext|>, not SmolLM2's chat-marker BOS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interp.model.loaded import LoadedModel
from interp.model.loading import load_hf
from interp.model.prefix import PromptPrefix, turn_markers
from tests.equality import Layout, assert_values_equal

pytestmark = pytest.mark.integration

PROMPT = "The Colosseum is located in the city of"


def _p_answer(hf: torch.nn.Module, ids: list[int], answer_id: int) -> float:
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, -1]
    return float(torch.softmax(logits.double(), -1)[answer_id])


def test_smollm2_prefix_is_the_document_separator(smol: LoadedModel) -> None:
    assert smol.prefix == PromptPrefix(0, "<|endoftext|>", "zoo")
    # Its tokenizer declares the chat template's turn opener as BOS: the thing to avoid.
    assert smol.tokenizer.bos_token == "<|im_start|>"
    assert turn_markers(smol.tokenizer, ["<|im_start|>", "<|endoftext|>"]) == {"<|im_start|>"}
    assert smol.provenance.to_dict()["prefix"] == {"token_id": 0, "text": "<|endoftext|>", "source": "zoo"}


def test_causal_trace_p_clean_equals_plain_hf(smol: LoadedModel, tmp_path: Path) -> None:
    """`interp run causal-trace` on the Colosseum prompt: p_clean is plain HF's p(" Rome") on the
    same token sequence, <|endoftext|> + the prompt, and far from the <|im_start|> one. Equal as
    two computations of one forward pass are: the trace runs the clean row in a batch with the
    corrupted ones, the reference alone (tests/equality.py, Layout.REORDERED)."""
    proc = subprocess.run(
        [sys.executable, "-m", "interp.cli", "run", "causal-trace", "--prompt", PROMPT,
         "--subject", "The Colosseum", "--answer", "Rome", "--kinds", "state", "--samples", "1",
         "--json", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    p_clean = json.loads(proc.stdout)["metrics"]["mean_p_clean"]
    hf, _, _ = load_hf("smollm2-135m")
    body = smol.encode(PROMPT, prefix=False)
    rome = smol.encode(" Rome", prefix=False)[0]
    with_eot = _p_answer(hf, [0, *body], rome)
    with_chat = _p_answer(hf, [1, *body], rome)
    print(f"p_clean {p_clean!r}, plain HF {with_eot!r}: difference {abs(p_clean - with_eot):.2e}")
    assert_values_equal({"p_clean": p_clean}, {"p_clean": with_eot}, Layout.REORDERED)
    assert abs(p_clean - with_chat) > 0.05, (p_clean, with_chat)
