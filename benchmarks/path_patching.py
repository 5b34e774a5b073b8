"""Benchmark: exact direct path patching of every head into one receiver set, batched by the
engine (interp.patching.paths) against one forward pass per edge (the loop of the IOI code of
Wang et al. 2022 and of ARENA's path-patching exercises), in the same run.

Receiver set (default): the query, key and value of head 0 at two thirds of the depth, as a
set (Wang et al.'s receivers are a head's inputs). Senders: every head below it. Prompts: the
conflict prompts of the other patching benchmarks as clean prompts and their consistent twins
(equal token length) as corrupt ones; metric: the logit difference memory - context answer.

The baseline is written here with plain torch hooks on an un-hooked copy of the HF model (a
Llama-like one): per sender, one forward pass on the clean prompts where each receiver's
projection slice is recomputed from its input norm on (input + the sender's change). Both
compute their clean and corrupt runs inside the timing, interleaved over ``--rounds``; the
values of the timed runs are compared before the times are reported. Prints one JSON object.
"""

from __future__ import annotations

import platform
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks._common import conflict_prompts, emit, interleaved, load, parse_args
from interp.patching.edges import Receiver, parse_receivers, senders_before
from interp.patching.metrics import LogitDiff
from interp.patching.pairs import pair_runs
from interp.patching.paths import path_patch


def _record(plain: Any, ids: torch.Tensor) -> dict[str, dict[int, torch.Tensor]]:
    """z (the output projection's input) and each layer's input, by plain hooks."""
    rec: dict[str, dict[int, torch.Tensor]] = {"z": {}, "x": {}}
    handles = []
    for i, layer in enumerate(plain.model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: rec["z"].__setitem__(i, a[0].detach())))
        handles.append(layer.input_layernorm.register_forward_pre_hook(
            lambda m, a, i=i: rec["x"].__setitem__(i, a[0].detach())))
    try:
        with torch.no_grad():
            plain(ids)
    finally:
        for h in handles:
            h.remove()
    return rec


def loop_baseline(plain: Any, clean: torch.Tensor, corrupt: torch.Tensor, senders: list[tuple[int, int]],
                  receivers: list[Receiver], metric: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One forward per edge: values [senders, prompts]."""
    layers = plain.model.layers
    e = layers[0].self_attn.head_dim
    rec_c, rec_x = _record(plain, clean), _record(plain, corrupt)
    out = []
    for layer, head in senders:
        cols = slice(head * e, (head + 1) * e)
        w = layers[layer].self_attn.o_proj.weight[:, cols]
        delta = (rec_x["z"][layer][..., cols] - rec_c["z"][layer][..., cols]) @ w.T
        handles = []
        for r in receivers:
            block = layers[int(r.layer or 0)]
            proj = {"q": block.self_attn.q_proj, "k": block.self_attn.k_proj, "v": block.self_attn.v_proj}[str(r.kind)]
            h = int(r.head or 0)  # a query head for q, a kv head for k and v
            rcols = slice(h * e, (h + 1) * e)
            x_in = rec_c["x"][int(r.layer or 0)]

            def edit(m: Any, a: Any, o: torch.Tensor, block: Any = block, proj: Any = proj, rcols: slice = rcols,
                     x_in: torch.Tensor = x_in, delta: torch.Tensor = delta) -> torch.Tensor:
                o = o.clone()
                o[..., rcols] = proj.forward(block.input_layernorm.forward(x_in + delta))[..., rcols]
                return o

            handles.append(proj.register_forward_hook(edit))
        try:
            with torch.no_grad():
                out.append(metric(plain(clean).logits))
        finally:
            for hd in handles:
                hd.remove()
    return torch.stack(out).double()


def main() -> None:
    args = parse_args(__doc__ or "")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, plain = load(args.model, random_init=args.random_init)
    if model.layout.family != "llama-like":
        raise SystemExit(f"the loop baseline is written for Llama-like models, not {model.layout.family}")
    info = model.info
    n_prompts = 4 if args.quick else 8
    rounds = args.rounds or 1
    layer = 2 * info.n_layers // 3
    receivers = list(parse_receivers([f"q:{layer}.0", f"k:{layer}.0", f"v:{layer}.0"]))
    clean, corrupt, memory, context = conflict_prompts(model, n_prompts)
    metric = LogitDiff(memory, context)
    senders = senders_before(info, receivers, kinds=("head",))
    idx = torch.arange(n_prompts)

    def engine() -> torch.Tensor:
        runs = pair_runs(model, clean, corrupt, metric)
        return path_patch(model, runs, senders, receivers).values

    def baseline() -> torch.Tensor:
        pairs = [(int(s.layer or 0), int(s.head or 0)) for s in senders]
        return loop_baseline(plain, clean, corrupt, pairs, receivers, lambda lg: metric(lg[:, -1:], idx))

    def plain_forward() -> float:
        from benchmarks._common import plain_forward_seconds

        return plain_forward_seconds(plain, clean)

    # The timed runs' own values are compared before any time is reported (float32 model: the
    # two compute the same sums in different orders).
    eng_t, base_t, plain_t, got, want = interleaved(rounds, engine, baseline, plain_forward)
    diff = float((got - want).abs().max())
    scale = float(want.abs().max())
    if diff > 1e-4 * max(1.0, scale):
        raise SystemExit(f"engine and loop disagree: max difference {diff:.3g} (scale {scale:.3g})")
    result: dict[str, Any] = {
        "benchmark": "path_patching", "model": model.name, "device": str(model.device), "dtype": str(model.dtype),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "receivers": [r.name for r in receivers], "senders": len(senders), "prompts": n_prompts,
        "tokens": int(clean.shape[1]), "max_abs_diff": diff, "values_scale": scale,
        "engine_seconds": statistics.median(eng_t), "loop_seconds": statistics.median(base_t),
        "plain_forward_seconds": statistics.median(plain_t), "rounds": rounds,
        "speedup": statistics.median(base_t) / statistics.median(eng_t),
    }
    emit(result)
    print(f"{len(senders)} senders -> {','.join(r.name for r in receivers)} on {n_prompts} prompts: equal to "
          f"{diff:.2g}; engine {result['engine_seconds']:.2f} s, loop {result['loop_seconds']:.2f} s, "
          f"{result['speedup']:.1f}x", file=sys.stderr)


if __name__ == "__main__":
    main()
