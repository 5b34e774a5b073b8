"""Benchmark: one engine sweep per intervention kind against the TransformerLens idiom on the
bridge, on the conflict prompts, metric = logit diff (memory answer - context answer) at the
last token, per prompt.

Kinds (--kinds, comma-separated, default all):

- positions_patch: Sweep("positions", "patch"): resid_pre at each (layer, position) patched from
  the consistent prompts; baseline transformer_lens.patching.get_act_patch_resid_pre (with
  --quick, generic_activation_patch with layer_pos_patch_setter over the same cells).
- windows_patch: Sweep("windows", "patch"): mlp_out over ROME's 10-layer window around each
  layer, at each position, patched from the consistent prompts; baseline one run_with_hooks
  per (layer, position) with one hook per layer of the window.
- heads_zero, heads_mean: Sweep("heads", "zero" / "mean"): each head's z at all positions set
  to zero / to its mean over prompts and positions of the conflict run; baseline one
  run_with_hooks per head on hook_z.
- positions_knockout: Sweep("positions", "knockout"): at each (layer, key position), all
  heads' attention scores from the last token to that key set to -inf; baseline one
  run_with_hooks per cell on hook_attn_scores.

Engine (interp.patching.execution.run_sweep) vs (a) the TransformerLens idiom on model.backend.bridge
(its time includes the run that caches what it patches in, as the engine's does) and (b) the
plain un-hooked HF forward of the same batch. Both results are compared first (per prompt,
max abs difference); engine and baseline are timed in the same process, interleaved. Prints
one JSON object; exits 1 if a kind differs by more than 1e-4.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

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

KINDS = ("positions_patch", "windows_patch", "heads_zero", "heads_mean", "positions_knockout")
TOLERANCE = 1e-4
WINDOW = 10

Hooks = list[tuple[str, Callable[..., Any]]]


def parse() -> tuple[argparse.Namespace, list[str]]:
    """_common's options plus --kinds."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--kinds", default=",".join(KINDS))
    known, rest = pre.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = parse_args(__doc__ or "")
    kinds = [k.strip() for k in known.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise SystemExit(f"unknown kind {bad[0] if bad else '(none)'!r}; known: {', '.join(KINDS)}")
    return args, kinds


def window(layer: int, n_layers: int) -> range:
    # ROME's trace_important_window: layers [L - w//2, L + ceil(w/2)) clipped to the model.
    return range(max(0, layer - WINDOW // 2), min(n_layers, layer + (WINDOW + 1) // 2))


def main() -> None:
    args, kinds = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, plain = load(args.model, random_init=args.random_init)
    n_layers, n_heads = model.info.n_layers, model.info.n_heads
    n_prompts = 4 if args.quick else 16
    layers = (n_layers // 2, n_layers - 1) if args.quick else None
    sel_layers = layers if layers is not None else tuple(range(n_layers))
    rounds = args.rounds or (2 if args.quick else 1)
    conflict, consistent, memory, context = conflict_prompts(model, n_prompts)
    seq_len = int(conflict.shape[1])
    last = seq_len - 1
    metric = LogitDiff(memory, context)
    bridge = model.backend.bridge

    dev = model.device
    rows = torch.arange(n_prompts, device=dev)
    mem_ids, ctx_ids = torch.tensor(memory, device=dev), torch.tensor(context, device=dev)

    def tl_metric(logits: torch.Tensor) -> torch.Tensor:
        """Per prompt logit[memory] - logit[context] at the last token, from full logits."""
        lg = logits[:, -1, :]
        return lg[rows, mem_ids] - lg[rows, ctx_ids]

    def cache_of(tokens: torch.Tensor, suffix: str) -> Any:
        return bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith(suffix))[1]

    def hook_loop(cells: list[Hooks]) -> torch.Tensor:
        """TransformerLens's per-index idiom: one run_with_hooks per swept cell."""
        return torch.stack([tl_metric(bridge.run_with_hooks(conflict, fwd_hooks=hooks)) for hooks in cells])

    # ---- TransformerLens-idiom hooks, written against the TL activation shapes.
    def set_pos(act: torch.Tensor, hook: Any, pos: int, clean: torch.Tensor) -> torch.Tensor:
        act[:, pos] = clean[:, pos]
        return act

    def set_head(act: torch.Tensor, hook: Any, head: int, value: torch.Tensor | float) -> torch.Tensor:
        act[:, :, head] = value  # z: [batch, pos, head, d_head]
        return act

    def block_key(scores: torch.Tensor, hook: Any, query: int, key: int) -> torch.Tensor:
        scores[:, :, query, key] = float("-inf")  # [batch, head, query, key], pre-softmax
        return scores

    from transformer_lens import patching

    def base_positions_patch() -> torch.Tensor:
        clean = cache_of(consistent, "hook_resid_pre")
        if layers is None:
            out = patching.get_act_patch_resid_pre(bridge, conflict, clean, tl_metric, reduce="none")
        else:
            index_df = pd.DataFrame([(la, p) for la in sel_layers for p in range(seq_len)], columns=["layer", "pos"])
            out = patching.generic_activation_patch(
                bridge, conflict, clean, tl_metric, patch_setter=patching.layer_pos_patch_setter,
                activation_name="resid_pre", index_df=index_df, reduce="none",
            )
        return out.values.reshape(-1, n_prompts)

    def base_windows_patch() -> torch.Tensor:
        clean = cache_of(consistent, "hook_mlp_out")
        cells: list[Hooks] = []
        for layer in sel_layers:
            for p in range(seq_len):
                cells.append([
                    (f"blocks.{w}.hook_mlp_out", partial(set_pos, pos=p, clean=clean[f"blocks.{w}.hook_mlp_out"]))
                    for w in window(layer, n_layers)
                ])
        return hook_loop(cells)

    def base_heads_zero() -> torch.Tensor:
        return hook_loop([
            [(f"blocks.{la}.attn.hook_z", partial(set_head, head=h, value=0.0))]
            for la in sel_layers for h in range(n_heads)
        ])

    def base_heads_mean() -> torch.Tensor:
        ref = cache_of(conflict, "attn.hook_z")
        means = {la: ref[f"blocks.{la}.attn.hook_z"].mean(dim=(0, 1)) for la in sel_layers}  # [head, d_head]
        return hook_loop([
            [(f"blocks.{la}.attn.hook_z", partial(set_head, head=h, value=means[la][h]))]
            for la in sel_layers for h in range(n_heads)
        ])

    def base_positions_knockout() -> torch.Tensor:
        return hook_loop([
            [(f"blocks.{la}.attn.hook_attn_scores", partial(block_key, query=last, key=p))]
            for la in sel_layers for p in range(seq_len)
        ])

    specs: dict[str, tuple[Sweep, torch.Tensor | None, Callable[[], torch.Tensor], str]] = {
        "positions_patch": (
            Sweep("positions", "patch", layers=layers), consistent, base_positions_patch,
            "transformer_lens.patching." + ("generic_activation_patch(layer_pos_patch_setter, resid_pre)"
                                            if layers else "get_act_patch_resid_pre") + ", reduce='none'",
        ),
        "windows_patch": (
            Sweep("windows", "patch", layers=layers, window=WINDOW), consistent, base_windows_patch,
            "run_with_hooks per (layer, position), one hook_mlp_out hook per window layer",
        ),
        "heads_zero": (Sweep("heads", "zero", layers=layers), None, base_heads_zero,
                       "run_with_hooks per head, hook_z[:, :, head] = 0"),
        "heads_mean": (Sweep("heads", "mean", layers=layers), None, base_heads_mean,
                       "run_with_hooks per head, hook_z[:, :, head] = mean over prompts and positions"),
        "positions_knockout": (
            Sweep("positions", "knockout", layers=layers), None, base_positions_knockout,
            "run_with_hooks per (layer, key), hook_attn_scores[:, :, last, key] = -inf",
        ),
    }

    with torch.no_grad():
        bridge(conflict)  # warm-up of the bridge's lazy setup, for engine and baseline alike
        plain_base = tl_metric(plain(conflict).logits).double().cpu()  # the unedited run, un-hooked
    out: dict[str, Any] = {}
    failed: list[str] = []
    for name in kinds:
        sweep, source, baseline_fn, baseline_desc = specs[name]

        def engine(sweep: Sweep = sweep, source: torch.Tensor | None = source) -> SweepResult:
            return run_sweep(model, sweep, metric, conflict, source)

        def baseline(fn: Callable[[], torch.Tensor] = baseline_fn) -> torch.Tensor:
            with torch.no_grad():
                return fn()

        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                engine()
            print(f"--- {name}", file=sys.stderr)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)

        engine_t, base_t, plain_t, res, tl = interleaved(
            rounds, engine, baseline, lambda: plain_forward_seconds(plain, conflict)
        )
        assert isinstance(res, SweepResult)
        tl = tl.double().cpu()
        if tl.shape != res.values.shape:
            raise SystemExit(f"{name}: baseline shape {tuple(tl.shape)} vs engine {tuple(res.values.shape)}")
        diff = float((res.values - tl).abs().max())
        e, b, p = statistics.median(engine_t), statistics.median(base_t), statistics.median(plain_t)
        n_cases = res.values.shape[0]
        same = diff <= TOLERANCE
        if not same:
            failed.append(name)
        out[name] = {
            "sweep": sweep.to_dict(),
            "baseline": baseline_desc,
            "engine_s": e,
            "baseline_s": b,
            "ratio": b / e,
            "max_abs_diff": diff,
            "same_numbers": same,
            "max_abs_effect": float((tl - res.base[None, :]).abs().max()),
            "base_vs_plain_max_abs_diff": float((res.base - plain_base).abs().max()),
            "plain_forward_s": p,
            "engine_fraction_of_plain_forward": (n_cases / e) / (1.0 / p),
            "baseline_fraction_of_plain_forward": (n_cases / b) / (1.0 / p),
            "n_cases": n_cases,
            "n_prompts": n_prompts,
            "seq_len": seq_len,
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "rounds": {"engine_s": engine_t, "baseline_s": base_t, "plain_forward_s": plain_t},
            "engine_stats": {k: v for k, v in res.stats.items() if k != "chunk_sizes"},
        }
    emit({
        "benchmark": "sweep_kinds",
        "quick": args.quick,
        "model": model.name,
        "device": str(model.device),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "n_prompts": n_prompts,
        "seq_len": seq_len,
        "layers": list(sel_layers),
        "metric": "logit_diff(memory - context) at the last token, compared per prompt",
        "ratio": "baseline_s / engine_s",
        "engine_fraction_of_plain_forward": "(cases / engine_s) / (1 / plain_forward_s): one case is one "
                                            "forward's worth of token positions (n_prompts x seq_len)",
        "max_abs_effect": "largest |baseline value - unedited value|: the edits move the metric, so equal numbers "
                          "are not vacuous",
        "base_vs_plain_max_abs_diff": "engine's unedited run vs the plain HF forward",
        "tolerance": TOLERANCE,
        "failed": failed,
        "kinds": out,
    })
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
