"""DeCoRe on a plain transformers model object (decore_generate(model, tokenizer, ...)) on the
four tiny architectures: token for token the loop ``interp decore`` runs on a LoadedModel, and
the hand-written reference (two full passes per step, raw hooks, no cache); sampling is
``generate``'s draw on the same random stream and reproducible with a seed; the model is left
without hooks."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from circuits.methods.decoding import left_pad
from circuits.methods.decore import decore_generate
from interp.errors import UserError
from tests.decore_reference import hand_decode
from tests.tiny import loaded, no_hooks_left, run_cli, tiny_tokenizer

HEADS = [(1, 0), (2, 3)]
TEXTS = ["w5 w9 w17 w33 w40 w41", "w77 w12", "w64 w65 w66 w70", "w8", "w100 w101 w102 w103 w104 w105 w106",
         "w30 w31", "w44 w45 w46", "w90 w91 w92 w93", "w120 w6", "w50 w51 w52 w53 w54"]
STEPS = 6


class _Plain:
    """The plain HF model under test (``hf``) with the tokenizer, and the prompt rows as the
    LoadedModel encodes them (after its prompt prefix), so both sides decode the same ids."""

    def __init__(self, tiny: Any) -> None:
        self.hf = copy.deepcopy(tiny).eval()
        self.tokenizer = tiny_tokenizer()
        self.model = loaded(copy.deepcopy(tiny), "bridge")
        self.rows = [self.model.encode(t) for t in TEXTS]


@pytest.fixture
def plain(tiny_hf: Any) -> _Plain:
    return _Plain(tiny_hf)


@pytest.mark.parametrize(("method", "alpha", "prefill"), [("uniform", "entropy", "masked"), ("zero", 0.5, "shared")])
def test_plain_model_equals_interp_decores_loop_and_the_hand_reference(
    plain: _Plain, method: str, alpha: Any, prefill: str
) -> None:
    with no_hooks_left(plain):
        got = decore_generate(plain.hf, plain.tokenizer, plain.rows, HEADS, alpha, max_new_tokens=STEPS,
                              method=method, prefill=prefill)  # type: ignore[arg-type]
    ref = decore_generate(plain.model, None, plain.rows, HEADS, alpha, max_new_tokens=STEPS, method=method,
                          prefill=prefill)  # type: ignore[arg-type]
    assert [g.tokens for g in got] == [r.tokens for r in ref]
    for g, r in zip(got, ref, strict=True):
        assert g.alphas == pytest.approx(r.alphas, abs=1e-4)
        assert g.scores == pytest.approx(r.scores, abs=1e-4)
    for row, g in zip(plain.rows, got, strict=True):
        toks, scores, alphas = hand_decode(plain.hf, row, HEADS, method, alpha, len(g.tokens),
                                           shared_prefill=prefill == "shared")
        assert g.tokens == toks
        assert g.scores == pytest.approx(scores, abs=1e-4)
        assert g.alphas == pytest.approx(alphas, abs=1e-4)


def _generate_rows(hf: Any, rows: list[list[int]], **kw: Any) -> list[list[int]]:
    """transformers' own generate on the same left-padded batch, each row cut after its EOS."""
    ids, mask = left_pad(rows, 2)
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, pad_token_id=2, eos_token_id=1,
                      top_k=0, **kw)[:, ids.shape[1]:].tolist()
    return [r[: r.index(1) + 1] if 1 in r else r for r in out]


def test_nothing_masked_is_generate_greedy_and_sampled(plain: _Plain) -> None:
    """With no heads masked (or alpha 0) the combined scores are the base log-probs: greedy is
    generate's greedy, and a draw on torch's global stream is generate's draw."""
    greedy = decore_generate(plain.hf, plain.tokenizer, plain.rows, [], 0.0, max_new_tokens=STEPS)
    assert [g.tokens for g in greedy] == _generate_rows(plain.hf, plain.rows, do_sample=False)
    torch.manual_seed(11)
    drawn = decore_generate(plain.hf, plain.tokenizer, plain.rows, HEADS, 0.0, max_new_tokens=STEPS, do_sample=True,
                            temperature=1.3, top_p=0.9)
    torch.manual_seed(11)
    want = _generate_rows(plain.hf, plain.rows, do_sample=True, temperature=1.3, top_p=0.9)
    assert [g.tokens for g in drawn] == want
    assert want != [g.tokens for g in greedy]  # a draw, not the argmax


def test_sampling_with_a_seed_is_reproducible(plain: _Plain) -> None:
    kw: dict[str, Any] = {"max_new_tokens": STEPS, "do_sample": True, "temperature": 1.5, "top_p": 0.95, "top_k": 40}
    first = decore_generate(plain.hf, plain.tokenizer, plain.rows, HEADS, "entropy", seed=7, **kw)
    torch.manual_seed(0)  # the global stream does not matter with a seed
    again = decore_generate(plain.hf, plain.tokenizer, plain.rows, HEADS, "entropy", seed=7, **kw)
    other = decore_generate(plain.hf, plain.tokenizer, plain.rows, HEADS, "entropy", seed=8, **kw)
    assert [g.tokens for g in first] == [g.tokens for g in again]
    assert [g.tokens for g in first] != [g.tokens for g in other]
    on_loaded = decore_generate(plain.model, None, plain.rows, HEADS, "entropy", seed=7, **kw)
    assert [g.tokens for g in on_loaded] == [g.tokens for g in first]
    # Keeping only the most likely token makes a draw the greedy choice.
    narrow = decore_generate(plain.hf, plain.tokenizer, plain.rows, HEADS, "entropy", max_new_tokens=STEPS,
                             do_sample=True, top_p=1e-6, seed=3)
    greedy = decore_generate(plain.hf, plain.tokenizer, plain.rows, HEADS, "entropy", max_new_tokens=STEPS)
    assert [g.tokens for g in narrow] == [g.tokens for g in greedy]


def test_text_prompts_use_the_tokenizers_special_tokens(plain: _Plain) -> None:
    by_text = decore_generate(plain.hf, plain.tokenizer, TEXTS[:3], HEADS, max_new_tokens=3)
    own = [plain.tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    by_ids = decore_generate(plain.hf, plain.tokenizer, own, HEADS, max_new_tokens=3)
    assert [g.prompt_tokens for g in by_text] == own
    assert [g.tokens for g in by_text] == [g.tokens for g in by_ids]


def test_bad_input(tiny_llama_hf: Any) -> None:
    hf = copy.deepcopy(tiny_llama_hf).eval()
    tok = tiny_tokenizer()
    for kw, message in (
        ({"tokenizer": None}, "needs its tokenizer"),
        ({"temperature": 0.7}, "give do_sample=True"),
        ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
        ({"do_sample": True, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"heads": [(3, 0)]}, "layer 3 out of range"),
        ({"heads": [(0, 4)]}, "head 4 out of range"),
    ):
        args = {"tokenizer": tok, "heads": HEADS, **kw}
        with pytest.raises(UserError, match=message):
            decore_generate(hf, args.pop("tokenizer"), ["w5 w6"], args.pop("heads"), max_new_tokens=2, **args)
    hf.train()
    with pytest.raises(UserError, match="training mode"):
        decore_generate(hf, tok, ["w5 w6"], HEADS, max_new_tokens=2)
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    decore_generate(model, None, ["w5 w6"], HEADS, max_new_tokens=1)  # bridges its module tree
    with pytest.raises(UserError, match="pass the LoadedModel itself"):
        decore_generate(model.hf, model.tokenizer, ["w5 w6"], HEADS, max_new_tokens=1)
    with pytest.raises(UserError, match="its own tokenizer"):
        decore_generate(model, tok, ["w5 w6"], HEADS, max_new_tokens=1)


def test_interp_decore_cli_equals_the_plain_model(tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``interp decore`` on a folder, greedy, against decore_generate on the folder loaded by
    plain transformers, with the prompts encoded as the CLI encodes them (after its prefix)."""
    args = ["decore", "-m", str(tiny_folder), "--heads", "1.0,2.3", "--max-new-tokens", str(STEPS), "--json"]
    for text in TEXTS:
        args += ["-p", text]
    code, out, err = run_cli(capsys, args)
    assert code == 0, err
    cli = json.loads(out)["results"]
    hf = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    bos = tok.convert_tokens_to_ids("<bos>")
    rows = [[bos, *tok(t, add_special_tokens=False)["input_ids"]] for t in TEXTS]
    got = decore_generate(hf, tok, rows, HEADS, max_new_tokens=STEPS)
    assert [r["decore_tokens"] for r in cli] == [g.tokens for g in got]
    assert [r["decore"] for r in cli] == [g.text for g in got]
