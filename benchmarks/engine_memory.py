"""Benchmark: peak memory of an all-heads patching sweep (z at all positions, patched from the
consistent prompts into the conflict prompts, metric = logit diff at the last token) under the
engine's default memory budget (interp.patching.execution.default_budget: a quarter of the free memory).

Measures the process's resident memory before loading the model, after loading it (bridge
booted) and after the sweep: current RSS (psutil), the lifetime peak (getrusage ru_maxrss),
and the peak during the sweep alone (the kernel's VmHWM, reset through /proc/self/clear_refs
just before the sweep, cross-checked by sampling RSS every 5 ms). Reports the engine's
chunking (run_sweep's stats) and the chunking the planner would choose for the sweep over all
layers. Prints one JSON object.

Options: _common's (--model, --quick: 4 prompts instead of 16, --threads) plus --layers
L,L,... to sweep only those layers' heads. Each chunk holds cases of one start layer
(n_heads of them while the budget allows that many per chunk), so the per-chunk peak does not
depend on how many chunks run; a run over a few layers measures the same peak as the full
sweep, up to the small caches for the other layers (reported as an estimate).

    .venv/bin/python -m benchmarks.engine_memory --model qwen2.5-1.5b --layers 0,27
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import threading
import time

import torch

from benchmarks._common import conflict_prompts, emit, parse_args, timed
from interp.patching.execution import run_sweep
from interp.patching.memory import default_budget
from interp.patching.metrics import LogitDiff
from interp.patching.planning import plan_chunks
from interp.patching.sweeps import Sweep

MiB = 2**20


def parse() -> tuple[argparse.Namespace, tuple[int, ...] | None]:
    """_common's options plus --layers."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--layers", default="")
    known, rest = pre.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = parse_args(__doc__ or "")
    if getattr(args, "random_init", False):
        raise SystemExit("--random-init is not supported by this benchmark")
    try:
        layers = tuple(int(x) for x in known.layers.split(",") if x.strip()) or None
    except ValueError:
        raise SystemExit(f"--layers takes comma-separated layer numbers, got {known.layers!r}") from None
    return args, layers


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return _status_kb("VmRSS")


def snapshot() -> dict[str, int | None]:
    return {
        "rss": current_rss(),
        "rss_anon": _status_kb("RssAnon"),  # heap: activations, caches, copied weights
        "rss_file": _status_kb("RssFile"),  # file-backed pages: memory-mapped weights, libraries
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "vm_hwm": _status_kb("VmHWM"),
    }


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """Highest RSS (and anonymous RSS) seen, sampled every ``every`` seconds (torch releases
    the GIL in its ops)."""

    def __init__(self, every: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.peak = 0
        self.peak_anon = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, current_rss() or 0)
            self.peak_anon = max(self.peak_anon, _status_kb("RssAnon") or 0)
            self.samples += 1
            time.sleep(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def mib(x: int | None) -> float | None:
    return None if x is None else round(x / MiB, 1)


def main() -> None:
    args, layers = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    import interp

    before = snapshot()
    load_s, model = timed(lambda: interp.load_model(args.model))
    _ = model.backend  # boot the bridge: part of what a loaded model holds
    loaded = snapshot()
    info = model.info
    n_prompts = 4 if args.quick else 16
    conflict, consistent, memory, context = conflict_prompts(model, n_prompts)
    n_prompts, seq_len = (int(x) for x in conflict.shape)
    metric = LogitDiff(memory, context)
    sweep = Sweep("heads", "patch", layers=layers)
    # The weights may be memory-mapped from the safetensors file and paged in by the first
    # forward: one unedited run of the prompts first, so the sweep's peak counts its own memory.
    warm_s, _ = timed(lambda: model.run(conflict))
    budget = default_budget(model)  # what run_sweep will compute a moment later

    pre_sweep = snapshot()
    peak_reset = reset_peak()
    sampler = Sampler()
    sampler.start()
    sweep_s, res = timed(lambda: run_sweep(model, sweep, metric, conflict, consistent))
    sampler.stop()
    after = snapshot()

    st = res.stats
    per_case = int(st["bytes_per_case"])
    cap = int(st["budget_bytes"]) // per_case
    # The chunking the planner picks for the same sweep over every layer, without running it.
    full_starts = [v.start_layer for v in Sweep("heads", "patch").cases(model, seq_len)]
    full_chunks = plan_chunks(full_starts, cap, n_prompts, seq_len, info.n_layers, bool(st["prefix_reuse"]))
    full_sizes = [len(i) for _, i in full_chunks]
    item = torch.finfo(model.dtype).bits // 8
    # Full sweep's caches: resid_pre at every start layer > 0 (base run) and z at every layer (source).
    full_cache = item * n_prompts * seq_len * (
        (info.n_layers - 1) * info.d_model + info.n_layers * info.n_heads * info.d_head
    )
    sweep_peak = after["vm_hwm"] if peak_reset else None
    loaded_rss = pre_sweep["rss"]
    emit({
        "benchmark": "engine_memory",
        "model": model.name,
        "device": str(model.device),
        "dtype": str(model.dtype),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "n_layers": info.n_layers,
        "n_heads": info.n_heads,
        "n_prompts": n_prompts,
        "seq_len": seq_len,
        "layers": list(layers) if layers is not None else list(range(info.n_layers)),
        "n_cases": int(st["n_cases"]),
        "load_s": load_s,
        "warmup_forward_s": warm_s,
        "sweep_s": sweep_s,
        "default_budget_bytes": budget,
        "engine": {
            "budget_bytes": st["budget_bytes"],
            "bytes_per_case": per_case,
            "max_variants_per_chunk": cap,
            "chunks": st["chunks"],
            "chunk_sizes": st["chunk_sizes"],
            "largest_chunk_estimate_bytes": max(st["chunk_sizes"]) * per_case,
            "forwards": st["forwards"],
            "token_layers": st["token_layers"],
            "prefix_reuse": st["prefix_reuse"],
            "cache_bytes": st["cache_bytes"],
        },
        "full_sweep_plan": {
            "n_cases": len(full_starts),
            "chunks": len(full_chunks),
            "chunk_sizes": sorted(set(full_sizes)),
            "cache_bytes_estimate": full_cache,
        },
        "memory_bytes": {
            "before_load": before,
            "after_load": loaded,
            "before_sweep": pre_sweep,
            "after_sweep": after,
            "sweep_peak_vm_hwm": sweep_peak,
            "sweep_peak_sampled": sampler.peak,
            "sweep_peak_over_loaded": None if sweep_peak is None or loaded_rss is None else sweep_peak - loaded_rss,
            "sweep_peak_anon_sampled": sampler.peak_anon,
            "sweep_peak_anon_over_loaded": sampler.peak_anon - (pre_sweep["rss_anon"] or 0),
        },
        "memory_mib": {
            "rss_before_load": mib(before["rss"]),
            "rss_after_load": mib(loaded["rss"]),
            "peak_through_load": mib(loaded["ru_maxrss"]),
            "rss_file_after_load": mib(loaded["rss_file"]),
            "rss_before_sweep": mib(loaded_rss),
            "rss_file_before_sweep": mib(pre_sweep["rss_file"]),
            "sweep_peak": mib(sweep_peak),
            "sweep_peak_sampled": mib(sampler.peak),
            "sweep_peak_over_loaded": mib(None if sweep_peak is None or loaded_rss is None else sweep_peak - loaded_rss),
            "sweep_peak_anon_over_loaded": mib(sampler.peak_anon - (pre_sweep["rss_anon"] or 0)),
            "rss_after_sweep": mib(after["rss"]),
            "default_budget": mib(budget),
        },
        "samples": sampler.samples,
        "notes": [
            "rss: current resident set (psutil); rss_anon/rss_file: its anonymous and file-backed parts; "
            "ru_maxrss: getrusage peak; vm_hwm: /proc/self/status VmHWM",
            "before_sweep is after one unedited forward of the prompts, which pages in memory-mapped weights; "
            "sweep_peak_over_loaded and sweep_peak_anon_over_loaded are the sweep's own memory",
            f"sweep_peak: VmHWM after resetting it just before the sweep (peak_reset={peak_reset}); ru_maxrss "
            "after the reset may follow VmHWM down, so read peak_through_load for the lifetime peak",
            "the per-chunk peak does not depend on how many chunks run: chunks hold one start layer's "
            "cases each; compare engine.chunk_sizes with full_sweep_plan.chunk_sizes; a full run only "
            "adds full_sweep_plan.cache_bytes_estimate - engine.cache_bytes of caches",
            "default_budget is a quarter of MemAvailable when the sweep starts, so it depends on what else runs",
        ],
    })


if __name__ == "__main__":
    main()
