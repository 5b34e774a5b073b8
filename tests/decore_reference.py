"""DeCoRe computed by hand on a plain HF model, for the unit tests of DeCoRe decoding, scoring
and decore-eval's random-head control: the masked model is the same plain model with a head
masked by a raw hook on the query projection's output (uniform attention: the head's query slice
is zeroed) or on the output projection's input (zero ablation), and every decoding step
recomputes the whole sequence without a KV cache."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def _is_gpt2(hf: Any) -> bool:
    return hasattr(hf, "transformer")


@contextlib.contextmanager
def raw_mask(hf: Any, heads: Sequence[tuple[int, int]], method: str, from_pos: int = 0) -> Iterator[None]:
    """Mask heads of a plain HF model with raw hooks, at query positions >= from_pos."""
    cfg = hf.config
    n_heads = cfg.num_attention_heads if not _is_gpt2(hf) else cfg.n_head
    d_model = cfg.hidden_size if not _is_gpt2(hf) else cfg.n_embd
    d_head = getattr(cfg, "head_dim", None) or d_model // n_heads
    handles = []
    for layer, head in heads:
        sl = slice(head * d_head, (head + 1) * d_head)
        if _is_gpt2(hf):
            attn = hf.transformer.h[layer].attn
            q_mod, o_mod = attn.c_attn, attn.c_proj  # c_attn output: [q | k | v], q first
        else:
            attn = hf.model.layers[layer].self_attn
            q_mod, o_mod = attn.q_proj, attn.o_proj
        if method == "uniform":
            def fwd(_m, _i, out, sl=sl):
                out = out.clone()
                out[:, from_pos:, sl] = 0.0
                return out
            handles.append(q_mod.register_forward_hook(fwd))
        else:
            def pre(_m, args, sl=sl):
                x = args[0].clone()
                x[:, from_pos:, sl] = 0.0
                return (x, *args[1:])
            handles.append(o_mod.register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hand_entropy(logits: torch.Tensor) -> float:
    p = torch.softmax(logits.double(), -1)
    return float(-sum(float(x) * math.log(float(x)) for x in p if x > 0))


def hand_decode(
    plain: Any, prompt: list[int], heads: Sequence[tuple[int, int]], method: str, alpha: str | float, steps: int,
    shared_prefill: bool = False,
) -> tuple[list[int], list[float], list[float]]:
    """DeCoRe by hand: two full forward passes per step, no cache, no batching."""
    seq = list(prompt)
    toks, scores, alphas = [], [], []
    for _ in range(steps):
        ids = torch.tensor([seq])
        with torch.no_grad():
            base = plain(ids).logits[0, -1].double()
            with raw_mask(plain, heads, method, from_pos=len(prompt) - 1 if shared_prefill else 0):
                masked = plain(ids).logits[0, -1].double()
        a = hand_entropy(base) if alpha == "entropy" else float(alpha)
        s = (1 + a) * torch.log_softmax(base, -1) - a * torch.log_softmax(masked, -1)
        t = int(s.argmax())
        toks.append(t)
        scores.append(float(s[t]))
        alphas.append(a)
        seq.append(t)
    return toks, scores, alphas
