"""circuits/decoding.py against a naive loop: plain HF forward passes over separate, never-bridged
copies of the tiny models, the whole sequence recomputed every step (no KV cache, no padding)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from circuits.methods.decoding import Decoded, greedy_decode, left_pad, pad_id, prompt_rows, stop_reason
from interp.errors import UserError
from interp.model.backends import RunOutput
from interp.model.interventions import ablate_heads
from tests.tiny import loaded

EOS = 1
PROMPTS = [[0, 5, 9, 17, 33, 40, 41], [0, 77, 12], [0, 64, 65, 66, 70]]


def naive(hf: Any, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens up to and including EOS, one full forward pass per token."""
    seq, gen = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            tok = int(hf(torch.tensor([seq])).logits[0, -1].argmax())
        gen.append(tok)
        seq.append(tok)
        if tok == EOS:
            break
    return gen


def _o_proj(hf: Any, layer: int) -> Any:
    return hf.transformer.h[layer].attn.c_proj if hasattr(hf, "transformer") else hf.model.layers[layer].self_attn.o_proj


@pytest.mark.parametrize("feed_last_token", [False, True])
def test_equal_length_batch_matches_naive_loop(tiny_hf: Any, feed_last_token: bool) -> None:
    model = loaded(copy.deepcopy(tiny_hf), "bridge")
    ref = copy.deepcopy(tiny_hf)
    rows = [PROMPTS[0], [0, 8, 19, 20, 21, 100, 3]]
    out = greedy_decode(model, torch.tensor(rows), 8, feed_last_token=feed_last_token)
    assert out.tokens == [naive(ref, r, 8) for r in rows]
    for toks, stop in zip(out.tokens, out.stops, strict=True):
        assert stop == ("eos" if toks[-1] == EOS else "length")


def test_left_padded_ragged_batch_matches_each_prompt_alone(tiny_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_hf), "bridge")
    ref = copy.deepcopy(tiny_hf)
    ids, mask = left_pad(PROMPTS, pad_id(model))
    out = greedy_decode(model, ids, 6, attention_mask=mask)
    assert out.tokens == [naive(ref, p, 6) for p in PROMPTS]


def test_interventions_act_on_prefill_and_every_step(tiny_hf: Any) -> None:
    """Zero ablation of two heads equals the naive loop with their o_proj input columns zeroed."""
    model = loaded(copy.deepcopy(tiny_hf), "bridge")
    ref = copy.deepcopy(tiny_hf)
    heads = [(0, 1), (2, 3)]
    d = model.info.d_head

    def zero(cols: slice) -> Any:
        def hook(_m: Any, args: Any) -> Any:
            z = args[0].clone()
            z[..., cols] = 0.0
            return (z, *args[1:])

        return hook

    handles = [_o_proj(ref, la).register_forward_pre_hook(zero(slice(h * d, (h + 1) * d))) for la, h in heads]
    try:
        want = naive(ref, PROMPTS[0], 6)
    finally:
        for h in handles:
            h.remove()
    got = greedy_decode(model, torch.tensor([PROMPTS[0]]), 6, interventions=ablate_heads(heads, "zero"))
    assert got.tokens == [want]


def test_several_rows_per_sequence_are_fed_the_sequence_token(tiny_hf: Any) -> None:
    """Rows i and i + n are one sequence: with an intervention on the twin rows only, the base
    rows still decode as the naive loop, and both rows see the token chosen from the base row."""
    model = loaded(copy.deepcopy(tiny_hf), "bridge")
    ref = copy.deepcopy(tiny_hf)
    rows = [PROMPTS[0], [0, 8, 19, 20, 21, 100, 3]]
    ids = torch.tensor(rows + rows)
    twins_equal = []

    def choose(out: RunOutput) -> torch.Tensor:
        logits = out.logits[:, -1]
        twins_equal.append(torch.equal(logits[:2], logits[2:]))
        return logits[:2].argmax(-1)

    plain = greedy_decode(model, ids, 6, choose=choose)
    assert plain.tokens == [naive(ref, r, 6) for r in rows]
    assert all(twins_equal)
    twins_equal.clear()
    masked = greedy_decode(model, ids, 6, choose=choose, interventions=ablate_heads([(0, 1), (1, 2)], "zero", batch=(2, 3)))
    assert masked.tokens == plain.tokens
    assert not any(twins_equal)


def test_choose_bookkeeping_and_stops(tiny_llama_hf: Any) -> None:
    """A scripted choose: a sequence keeps its tokens up to its stop token and takes no more;
    decoding ends once all stopped, else after max_new_tokens passes."""
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    script = [[7, 8], [EOS, 9], [10, 11], [12, EOS], [13, 14]]
    seen: list[int] = []

    def choose(out: RunOutput) -> torch.Tensor:
        seen.append(int(out.logits.shape[1]))
        return torch.tensor(script[len(seen) - 1])

    out = greedy_decode(model, torch.tensor([PROMPTS[0], PROMPTS[0]]), 5, choose=choose)
    assert out == Decoded(tokens=[[7, EOS], [8, 9, 11, EOS]], stops=["eos", "eos"])
    assert seen == [7, 1, 1, 1]  # the prefill, then one token per pass; no pass after all stopped
    seen.clear()
    out = greedy_decode(model, torch.tensor([PROMPTS[0], PROMPTS[0]]), 3, choose=choose)
    assert out.tokens == [[7, EOS], [8, 9, 11]]
    assert out.stops == ["eos", "length"]
    assert len(seen) == 3


def test_cache_is_read_from_the_passes_that_choose(tiny_llama_hf: Any) -> None:
    """With feed_last_token the prefill is one token short and records nothing; every pass that
    chooses a token has the requested sites, its query the current position."""
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    shapes: list[tuple[int, ...]] = []

    def choose(out: RunOutput) -> torch.Tensor:
        shapes.append(tuple(out.cache["pattern.1"].shape))
        return out.logits[:, -1].argmax(-1)

    n = len(PROMPTS[0])
    greedy_decode(model, torch.tensor([PROMPTS[0]]), 3, cache=["pattern.1"], choose=choose, feed_last_token=True)
    assert shapes == [(1, 4, 1, n), (1, 4, 1, n + 1), (1, 4, 1, n + 2)]
    shapes.clear()
    greedy_decode(model, torch.tensor([PROMPTS[0]]), 2, cache=["pattern.1"], choose=choose)
    assert shapes == [(1, 4, n, n), (1, 4, 1, n + 1)]


def test_without_kv_cache_the_same_tokens(tiny_hf: Any) -> None:
    ref = copy.deepcopy(tiny_hf)
    ivs = ablate_heads([(1, 0)], "zero")
    for backend in ("bridge", "nnsight"):
        model = loaded(copy.deepcopy(tiny_hf), backend)
        out = greedy_decode(model, torch.tensor([PROMPTS[0]]), 6, kv_cache=False)
        assert out.tokens == [naive(ref, PROMPTS[0], 6)]
        cached = loaded(copy.deepcopy(tiny_hf), "bridge")
        assert (greedy_decode(model, torch.tensor([PROMPTS[2]]), 5, interventions=ivs, kv_cache=False).tokens
                == greedy_decode(cached, torch.tensor([PROMPTS[2]]), 5, interventions=ivs).tokens)


def test_bad_input(tiny_llama_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    one = torch.tensor([PROMPTS[0]])
    with pytest.raises(UserError, match="max_new_tokens"):
        greedy_decode(model, one, 0)
    with pytest.raises(UserError, match=">=2 tokens"):
        greedy_decode(model, torch.tensor([[0]]), 2, feed_last_token=True)
    with pytest.raises(UserError, match="longer than"):
        greedy_decode(model, one, 256)
    with pytest.raises(UserError, match="KV cache"):
        greedy_decode(model, one, 2, prefill_interventions=[], interventions=ablate_heads([(0, 0)]), kv_cache=False)
    with pytest.raises(UserError, match="KV cache"):
        greedy_decode(loaded(copy.deepcopy(tiny_llama_hf), "nnsight"), one, 2)


def test_prompt_helpers(tiny_llama_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    assert prompt_rows(model, ["w5 w6", [0, 9]]) == [[0, 5, 6], [0, 9]]
    assert prompt_rows(model, ["w5 w6"], prefix=False) == [[5, 6]]
    with pytest.raises(UserError, match="empty prompt"):
        prompt_rows(model, [[]])
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id(model))
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert stop_reason(model, EOS, False) == "eos"
    assert stop_reason(model, 5, True) is None
