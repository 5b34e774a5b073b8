"""The circuit task ``needle`` on smollm2-135m, checked with plain HF forward passes: each clean
prompt is a shipped needle's prompt plus the answer tokens before the first one the model copies
(top-1), and its corrupt prompt differs from it only in the needle's copy of the answer."""

from __future__ import annotations

import torch

from circuits.data.facts import answer_tokens
from circuits.data.needles import load_needles
from circuits.methods.circuit_tasks import needle_pairs
from interp.model.loaded import LoadedModel
from interp.model.loading import load_hf


def _top1(hf: torch.nn.Module, ids: list[int]) -> int:
    with torch.no_grad():
        return int(hf(torch.tensor([ids])).logits[0, -1].argmax())


def _find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


def test_needle_pairs_copy_the_first_answer_token_the_model_retrieves(smol: LoadedModel) -> None:
    pairs = needle_pairs(smol, 6, 150, 0)
    hf = load_hf("smollm2-135m")[0]
    n, length = pairs.clean.shape
    assert n >= 3, pairs.labels  # five of the six needles share one prompt length (measured)
    seen = set()
    for i in range(n):
        clean, corrupt = pairs.clean[i].tolist(), pairs.corrupt[i].tolist()
        text = smol.tokenizer.decode(clean)
        (needle,) = [nd for nd in load_needles() if nd.sentence in text]
        seen.add(needle.sentence)
        answer = answer_tokens(smol, needle.answer)
        # j forced answer tokens end the prompt; the next answer token is the task's answer.
        js = [j for j in range(len(answer)) if clean[len(clean) - j:] == answer[:j] and answer[j] == pairs.answers[i]]
        assert js, (i, text[-80:])
        j = js[0]
        question_end = len(clean) - j
        assert _top1(hf, clean) == pairs.answers[i]
        assert all(_top1(hf, clean[:question_end] + answer[:k]) != answer[k] for k in range(j))
        # The needle's copy of the answer lies in the context, before the question.
        (at,) = [p for p in _find(clean[:question_end], answer) if p < question_end - len(answer)][:1]
        differ = [p for p in range(length) if clean[p] != corrupt[p]]
        assert differ
        assert all(at <= p < at + len(answer) for p in differ), (differ, at)
        assert pairs.corrupt_answers[i] == corrupt[at + j] != pairs.answers[i]
    assert len(seen) == n  # one row per needle
