"""The take-home interventions on the zoo default (smollm2-135m, 9 query heads on 3 kv heads):
a pruned folder loaded by plain transformers in a fresh process equals run-time zero ablation
(a kv-slice bake does not), and ``interp decore`` equals decore_generate on the model loaded by
plain transformers, token for token on 10 prompts; a seeded draw repeats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import interp
from circuits.methods.decore import decore_generate
from interp.model.interventions import ablate_heads
from interp.model.layout import layout_of
from interp.model.loaded import LoadedModel
from interp.model.zoo import ensure_converted
from tests.plain_hf_logits import fresh_logits
from tests.tiny import run_cli

pytestmark = pytest.mark.integration

# Memory and context heads of the conflict-heads run in the README, and two heads sharing a kv head.
PRUNED = [(29, 0), (24, 4), (23, 3), (29, 1), (23, 1), (23, 0), (17, 3), (17, 4)]
TEXTS = [
    "The capital of France is",
    "The Colosseum is located in the city of",
    "Q: What is the largest planet? A:",
    "The capital of France is the city of Rome. Q: What is the capital of France? A:",
    "Albert Einstein was born in",
    "The Eiffel Tower is in the city of Berlin. The Eiffel Tower is in the city of",
    "Water boils at a temperature of",
    "The first president of the United States was",
    "Q: Which company makes the iPhone? A:",
    "Once upon a time, there was a little",
]
DECORE_HEADS = [(18, 6), (17, 4), (17, 3), (23, 2), (20, 6), (23, 7)]


def test_pruned_folder_equals_runtime_ablation_in_a_fresh_process(smol: LoadedModel, tmp_path: Path) -> None:
    folder = interp.save_pruned(smol, PRUNED, tmp_path / "pruned")
    # A wrong bake: each pruned head's kv head's value slice zeroed (its whole group of 3).
    plain = AutoModelForCausalLM.from_pretrained(ensure_converted("smollm2-135m")[0], dtype=torch.float32)
    layout, info = layout_of(plain), smol.info
    d = info.d_head
    with torch.no_grad():
        for layer, head in PRUNED:
            kv = head // info.group_size
            layout.value_weight(plain, layer, info)[kv * d : (kv + 1) * d] = 0.0
    plain.save_pretrained(tmp_path / "kv-slice")
    smol.tokenizer.save_pretrained(tmp_path / "kv-slice")
    del plain
    rows = [smol.encode(t) for t in TEXTS[:5]]
    source = ensure_converted("smollm2-135m")[0]
    got = fresh_logits([folder, tmp_path / "kv-slice"], rows, tmp_path)  # eager, as the workbench
    sdpa = fresh_logits([folder, source], rows, tmp_path, attn_implementation=None)
    with torch.no_grad():
        want = [smol.run(torch.tensor([r]), interventions=ablate_heads(PRUNED, "zero")).logits[0] for r in rows]
        base = [smol.run(torch.tensor([r])).logits[0] for r in rows]

    def diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))

    exact, wrong = diff(got[str(folder)]["logits"], want), diff(got[str(tmp_path / "kv-slice")]["logits"], want)
    kernel, unpruned_kernel = diff(sdpa[str(folder)]["logits"], want), diff(sdpa[str(source)]["logits"], base)
    print(f"smollm2-135m: max |logit diff| saved (eager) vs run-time = {exact:.3g}; kv-slice bake {wrong:.3g}; "
          f"saved (sdpa) vs run-time {kernel:.3g}, unpruned source (sdpa) vs workbench {unpruned_kernel:.3g}; "
          f"pruning moves logits by up to {diff(want, base):.3g}")
    assert exact < 1e-5
    assert wrong > 1e-2
    # transformers' default attention kernel differs from eager by rounding, as much pruned as not.
    assert kernel < max(2 * unpruned_kernel, 1e-5)
    assert got[str(folder)]["vocab"] == smol.tokenizer.get_vocab()
    card = (folder / "README.md").read_text()
    assert "smollm2-135m" in card
    assert "29.0, 24.4, 23.3" in card


def _plain_rows(tok: Any) -> list[list[int]]:
    """The prompts as ``interp decore`` encodes them: the zoo prefix, then the text."""
    prefix = tok.convert_tokens_to_ids("<|endoftext|>")
    return [[prefix, *tok(t, add_special_tokens=False)["input_ids"]] for t in TEXTS]


def test_interp_decore_equals_decore_on_the_plain_model(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["decore", "--heads", ",".join(f"{la}.{h}" for la, h in DECORE_HEADS), "--max-new-tokens", "8", "--json"]
    for t in TEXTS:
        args += ["-p", t]
    code, out, err = run_cli(capsys, args)
    assert code == 0, err
    cli = json.loads(out)["results"]
    folder = ensure_converted("smollm2-135m")[0]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    got = decore_generate(hf, tok, _plain_rows(tok), DECORE_HEADS, max_new_tokens=8)
    assert [r["decore_tokens"] for r in cli] == [g.tokens for g in got]
    assert [r["decore"] for r in cli] == [g.text for g in got]
    # DeCoRe changed something, or equality with greedy would have been enough.
    assert any(r["decore_tokens"] != r["greedy_tokens"] for r in cli)
    kw: dict[str, Any] = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": 1234}
    first = decore_generate(hf, tok, TEXTS, DECORE_HEADS, **kw)
    again = decore_generate(hf, tok, TEXTS, DECORE_HEADS, **kw)
    assert [g.tokens for g in first] == [g.tokens for g in again]
