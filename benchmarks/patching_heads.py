"""Benchmark: patch every head's output (z, all positions) from the consistent prompts into the
conflict prompts, metric = mean logit diff (memory answer - context answer) at the last token.

Engine (interp.patching.execution.run_sweep) vs (a) TransformerLens's per-index idiom on the bridge
(patching.get_act_patch_attn_head_out_all_pos; with --quick, generic_activation_patch over
the same subset of heads) and (b) the plain un-hooked HF forward of the same batch. Engine and
baseline are timed in the same process, interleaved; both results are compared first.
Prints one JSON object. With --random-init the model has random weights (seed 0) built from
its config in .gpu/<model>/ and runs on cuda when available (for machines without the weights).
"""

from __future__ import annotations

import platform
import statistics
import sys

import pandas as pd
import torch

from benchmarks._common import (
    conflict_prompts,
    emit,
    interleaved,
    load,
    parse_args,
    plain_forward_seconds,
)
from interp.patching.execution import run_sweep
from interp.patching.metrics import LogitDiff
from interp.patching.sweeps import Sweep, SweepResult


def main() -> None:
    args = parse_args(__doc__ or "")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, plain = load(args.model, random_init=args.random_init)
    n_prompts = 4 if args.quick else 16
    layers = (model.info.n_layers // 2, model.info.n_layers - 1) if args.quick else None
    rounds = args.rounds or (2 if args.quick else 1)
    conflict, consistent, memory, context = conflict_prompts(model, n_prompts)
    metric = LogitDiff(memory, context)
    sweep = Sweep("heads", "patch", layers=layers)
    bridge = model.backend.bridge
    pos_idx = torch.arange(n_prompts)

    def tl_metric(logits: torch.Tensor) -> torch.Tensor:
        return metric(logits[:, -1:, :], pos_idx).mean()

    from transformer_lens import patching

    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(consistent, names_filter=lambda n: n.endswith("attn.hook_z"))
    n_heads = model.info.n_heads
    sel_layers = layers if layers is not None else tuple(range(model.info.n_layers))
    index_df = pd.DataFrame([(layer, h) for layer in sel_layers for h in range(n_heads)], columns=["layer", "head"])

    def baseline() -> torch.Tensor:
        with torch.no_grad():
            if layers is None:
                return patching.get_act_patch_attn_head_out_all_pos(bridge, conflict, clean_cache, tl_metric).flatten()
            return patching.generic_activation_patch(
                bridge, conflict, clean_cache, tl_metric, patch_setter=patching.layer_head_vector_patch_setter,
                activation_name="z", index_df=index_df,
            )

    def engine() -> SweepResult:
        return run_sweep(model, sweep, metric, conflict, consistent)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)

    engine_t, base_t, plain_t, res, tl = interleaved(
        rounds, engine, baseline, lambda: plain_forward_seconds(plain, conflict)
    )
    assert isinstance(res, SweepResult)
    ours = res.mean().to(tl.dtype)
    diff = float((ours - tl.cpu()).abs().max())
    e, b, p = statistics.median(engine_t), statistics.median(base_t), statistics.median(plain_t)
    n_cases = res.values.shape[0]
    emit({
        "benchmark": "patching_heads",
        "quick": args.quick,
        "model": model.name,
        "random_init": args.random_init,
        "device": str(model.device),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "n_prompts": n_prompts,
        "seq_len": int(conflict.shape[1]),
        "n_cases": n_cases,
        "intervention": res.intervention,
        "baseline": "transformer_lens.patching on TransformerBridge (one forward per head)",
        "engine_s": e,
        "baseline_s": b,
        "ratio": b / e,
        "plain_forward_s": p,
        "plain_fraction": (n_cases / e) / (1.0 / p),
        "max_abs_diff": diff,
        "rounds": {"engine_s": engine_t, "baseline_s": base_t, "plain_forward_s": plain_t},
        "engine_stats": {k: v for k, v in res.stats.items() if k != "chunk_sizes"},
    })


if __name__ == "__main__":
    main()
