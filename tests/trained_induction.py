"""A 2-layer attention-only Llama trained here (seconds) to do induction, shared by the tests that
need a real previous-token head and real induction heads.

The model (rotary, grouped-query attention, its MLPs zeroed and frozen) is trained on random
token sequences repeated with a period drawn from 6..12 (a fixed period would let a layer-1 head
find its target by position alone; a small vocabulary would let it eliminate tokens already
repeated). Olsson et al. (2022) predict K-composition: a layer-0 head that attends to the
previous token writes it into each position, and the induction heads' keys read it there.
:func:`find_heads` finds both kinds of head from the plain HF model's attention patterns.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.tiny import VOCAB

LENGTH, PERIODS, STEPS = 26, (6, 13), 400


def periodic_batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences BOS + x x x... (x random, its period drawn per sequence) and the mask of the
    targets a previous occurrence predicts (from the second token of the second period on)."""
    rows, masks = [], []
    for _ in range(n):
        t = int(torch.randint(*PERIODS, (1,), generator=gen))
        x = torch.randint(4, VOCAB, (t,), generator=gen)
        rows.append(torch.cat([torch.zeros(1, dtype=torch.long), x.repeat(LENGTH // t + 1)[: LENGTH - 1]]))
        mask = torch.zeros(LENGTH - 1)
        mask[t + 1 :] = 1
        masks.append(mask)
    return torch.stack(rows), torch.stack(masks)


def train_induction_model() -> tuple[LlamaForCausalLM, float]:
    """The trained model (eval mode) and its mean masked loss over the last 20 steps."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
                      attn_implementation="eager")  # pyright: ignore[reportCallIssue]
    model = LlamaForCausalLM(cfg)
    for layer in model.model.layers:
        mlp: torch.nn.Module = layer.mlp  # type: ignore[assignment]
        for p in mlp.parameters():
            p.requires_grad_(False)
            p.zero_()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        ids, mask = periodic_batch(gen, 32)
        logits = model(ids).logits[:, :-1]
        per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
        loss = (per_token * mask.flatten()).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model.eval(), sum(losses[-20:]) / 20


def find_heads(hf: LlamaForCausalLM, clean: torch.Tensor, period: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """From the plain model's attention on ``clean`` (BOS x x[:-1], x of length ``period``): the
    layer-0 head attending most to the previous token, and the layer-1 head attending most, from
    the last position, to the token after the previous occurrence of the last token (position
    ``period``); then every layer-0 head's previous-token and every layer-1 head's induction
    attention."""
    with torch.no_grad():
        att = hf(clean, output_attentions=True).attentions
    prev = att[0].diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))
    induction = att[1][:, :, -1, period].mean(dim=0)
    return int(prev.argmax()), int(induction.argmax()), prev, induction
