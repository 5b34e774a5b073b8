"""CUDA correctness check: the same computations on the device and on the CPU must agree.

The unit tests build their tiny models on the CPU and have no device option, so this script
runs the core paths on copies of the tiny test models (tests/tiny.py: a Llama with grouped-query
attention and a GPT-2), one copy on the CPU and one on the device, each wrapped by the project's
LoadedModel with the bridge backend, and compares:

- forward: plain logits (and the bridge against the plain HF module on the device);
- ablate: AblateHeads zero (all rows, and a row/position subset) and mean ablation;
- patch: Patch from a cached source run (cache on the device, and offloaded to the CPU);
- sweep: interp.patching.execution.run_sweep heads x patch (also with offload), heads x zero, heads x mean,
  positions x patch (resid_pre), and the engine's value for one head against a direct Patch run;
- decode: circuits.methods.decore greedy_generate and decore_generate (KV-cached, left-padded batch),
  and greedy decoding against a step-by-step recompute without the KV cache on the device.

With ``--smollm``, the same forward / sweep / decode checks run on smollm2-135m with random
weights (seed 0) from its config in .gpu/smollm2-135m/ (see benchmarks/_common.py).

Pass criterion per check: max |device - cpu| <= tol * max(1, max |cpu|), tol = 1e-4 (fp32), and
decoded tokens identical. An exception is a failure; its traceback (with the innermost frame in
the project's code) is printed and stored. Without CUDA the device is the CPU (a smoke test).
Prints one line per check and writes a JSON report with --out. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4
RESULTS: list[dict[str, Any]] = []


# ----------------------------------------------------------------------------- helpers


def _max_diff(a: Any, b: Any) -> tuple[float, float]:
    """(max abs difference, max abs of the reference b) over tensors or nested lists/tuples."""
    if isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            raise AssertionError(f"structure differs: {type(a).__name__}[{len(a)}] vs {type(b).__name__}")
        pairs = [_max_diff(x, y) for x, y in zip(a, b, strict=True)]
        return max((p[0] for p in pairs), default=0.0), max((p[1] for p in pairs), default=0.0)
    ta = torch.as_tensor(a).detach().to("cpu", torch.float64)
    tb = torch.as_tensor(b).detach().to("cpu", torch.float64)
    if ta.shape != tb.shape:
        raise AssertionError(f"shape differs: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    if ta.numel() == 0:
        return 0.0, 0.0
    if not bool(torch.isfinite(ta).all()) or not bool(torch.isfinite(tb).all()):
        raise AssertionError("non-finite values")
    return float((ta - tb).abs().max()), float(tb.abs().max())


def _where(tb: Any) -> str:
    """The innermost frame of the project's code (interp/, circuits/, tests/) and the
    innermost frame overall, as file:line in function."""
    frames = traceback.extract_tb(tb)
    own = [f for f in frames if any(f"/{d}/" in f.filename for d in ("interp", "circuits", "tests"))
           and "site-packages" not in f.filename and not f.filename.endswith("gpu_check.py")]

    def fmt(f: traceback.FrameSummary) -> str:
        name = f.filename
        if name.startswith(str(ROOT)):
            name = name[len(str(ROOT)) + 1:]
        return f"{name}:{f.lineno} in {f.name}: {(f.line or '').strip()}"

    parts = []
    if own:
        parts.append("project: " + fmt(own[-1]))
    if frames:
        parts.append("innermost: " + fmt(frames[-1]))
    return " | ".join(parts)


def check(group: str, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one check; fn returns {'diff', 'scale'} (and optional 'ok', 'note'), or raises."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"group": group, "check": name}
    try:
        out = fn()
        diff, scale = float(out.get("diff", 0.0)), float(out.get("scale", 0.0))
        limit = TOL * max(1.0, scale)
        ok = bool(out.get("ok", True)) and diff <= limit
        rec.update({"status": "pass" if ok else "FAIL", "max_abs_diff": diff, "ref_max_abs": scale,
                    "limit": limit, **{k: v for k, v in out.items() if k not in ("diff", "scale", "ok")}})
    except Exception as exc:
        rec.update({"status": "ERROR", "error": f"{type(exc).__name__}: {exc}", "where": _where(exc.__traceback__),
                    "traceback": traceback.format_exc()})
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    RESULTS.append(rec)
    line = f"[{rec['status']:5}] {group:14} {name:34}"
    if "max_abs_diff" in rec:
        line += f" max|dev-cpu|={rec['max_abs_diff']:.3g} (ref max {rec['ref_max_abs']:.3g}, limit {rec['limit']:.3g})"
    if rec.get("note"):
        line += f"  {rec['note']}"
    if "error" in rec:
        line += f"\n        {rec['error']}\n        at {rec['where']}"
    print(line, flush=True)
    if rec["status"] == "ERROR":
        print(rec["traceback"], file=sys.stderr, flush=True)
    return rec


# ----------------------------------------------------------------------------- one model pair


class Pair:
    """The same HF model on the CPU and on the device, each wrapped by a LoadedModel (bridge)."""

    def __init__(self, hf: torch.nn.Module, wrap: Callable[[torch.nn.Module], Any], device: torch.device):
        self.cpu = wrap(copy.deepcopy(hf))
        self.dev = wrap(copy.deepcopy(hf).to(device))
        self.plain_dev = copy.deepcopy(hf).to(device).eval()  # un-hooked HF copy on the device
        if self.dev.device.type != device.type:
            raise AssertionError(f"LoadedModel.device is {self.dev.device}, expected {device}")

    def both(self, fn: Callable[[Any], Any]) -> tuple[Any, Any]:
        return fn(self.dev), fn(self.cpu)


def _on_device(x: torch.Tensor, model: Any) -> torch.Tensor:
    if x.device.type != model.device.type:
        raise AssertionError(f"result on {x.device}, model on {model.device}")
    return x


def model_checks(group: str, pair: Pair, tokens: torch.Tensor, src_tokens: torch.Tensor,
                 heads: Sequence[tuple[int, int]], prompts: Sequence[Sequence[int]], new_tokens: int,
                 sweep_layers: tuple[int, ...] | None = None, full: bool = True) -> None:
    from circuits.methods.decore import decore_generate, greedy_generate
    from interp.model.interventions import AblateHeads, Patch
    from interp.patching.execution import run_sweep
    from interp.patching.metrics import LogitDiff
    from interp.patching.sweeps import Sweep

    info = pair.cpu.info
    la, lb = heads[0][0], heads[-1][0]

    def run_logits(ivs: Sequence[Any] = (), sources: Any = None) -> Callable[[Any], torch.Tensor]:
        def f(m: Any) -> torch.Tensor:
            with torch.no_grad():
                return _on_device(m.run(tokens, interventions=ivs, sources=sources).logits, m)
        return f

    def compare(fn: Callable[[Any], Any], **extra: Any) -> dict[str, Any]:
        d, c = pair.both(fn)
        diff, scale = _max_diff(d, c)
        return {"diff": diff, "scale": scale, **extra}

    # forward
    check(group, "forward", lambda: compare(run_logits()))

    def bridge_vs_hf() -> dict[str, Any]:
        with torch.no_grad():
            ours = pair.dev.run(tokens).logits
            ref = pair.plain_dev(tokens.to(pair.dev.device)).logits
        diff, scale = _max_diff(ours, ref)
        return {"diff": diff, "scale": scale, "note": "bridge vs plain HF, both on the device"}

    check(group, "forward_bridge_vs_hf(device)", bridge_vs_hf)

    # ablation
    zero = [AblateHeads(layer=la, heads=(heads[0][1],)), AblateHeads(layer=lb, heads=(heads[-1][1], 0))]

    def ablate_zero() -> dict[str, Any]:
        out = compare(run_logits(zero))
        with torch.no_grad():
            plain = pair.dev.run(tokens).logits
            edited = pair.dev.run(tokens, interventions=zero).logits
        effect = float((edited - plain).abs().max())
        out.update(ok=effect > 0, note=f"effect on device {effect:.3g}")
        return out

    check(group, "ablate_zero", ablate_zero)
    sub = [AblateHeads(layer=lb, heads=(heads[-1][1],), positions=(1, 3), batch=(0,))]
    check(group, "ablate_zero_rows_positions", lambda: compare(run_logits(sub)))

    def ablate_mean() -> dict[str, Any]:
        def f(m: Any) -> torch.Tensor:
            with torch.no_grad():
                ref = m.run(src_tokens, cache=[f"z.{la}"]).cache
                iv = [AblateHeads(layer=la, heads=(heads[0][1],), method="mean", source="ref")]
                return _on_device(m.run(tokens, interventions=iv, sources={"ref": ref}).logits, m)
        return compare(f)

    check(group, "ablate_mean", ablate_mean)

    # patch from a cache
    def patch(offload: bool) -> Callable[[], dict[str, Any]]:
        def f(m: Any) -> torch.Tensor:
            with torch.no_grad():
                cache = m.run(src_tokens, cache=[f"z.{la}", f"resid_pre.{lb}"], cache_to_cpu=offload).cache
                want = "cpu" if offload else m.device.type
                if any(t.device.type != want for t in cache.values()):
                    raise AssertionError(f"cache on {[str(t.device) for t in cache.values()]}, wanted {want}")
                ivs = [Patch(f"z.{la}", source="clean", heads=(heads[0][1],)),
                       Patch(f"resid_pre.{lb}", source="clean", positions=(2,))]
                return _on_device(m.run(tokens, interventions=ivs, sources={"clean": cache}).logits, m)
        return lambda: compare(f)

    check(group, "patch_from_cache", patch(False))
    check(group, "patch_from_cpu_cache(offload)", patch(True))

    # engine sweeps
    n = tokens.shape[0]
    vocab = info.vocab_size
    g = torch.Generator().manual_seed(1)
    correct = torch.randint(0, vocab, (n,), generator=g).tolist()
    wrong = torch.randint(0, vocab, (n,), generator=g).tolist()
    metric = LogitDiff(correct, wrong)

    def sweep(over: str, kind: str, source: Any, offload: bool = False, layers: Any = None) -> Callable[[], dict[str, Any]]:
        def f(m: Any) -> Any:
            src = source.to(m.device) if isinstance(source, torch.Tensor) else source
            sw = Sweep(over, kind, layers=layers)  # type: ignore[arg-type]
            return run_sweep(m, sw, metric, tokens, src, offload=offload)

        def go() -> dict[str, Any]:
            d, c = pair.both(f)
            if d.labels != c.labels:
                raise AssertionError("case labels differ")
            diff, scale = _max_diff([d.values, d.base], [c.values, c.base])
            st = d.stats
            return {"diff": diff, "scale": scale, "n_cases": st["n_cases"], "chunks": st["chunks"],
                    "prefix_reuse": st["prefix_reuse"], "prefix_check_diff": st["prefix_check_diff"],
                    "cpu_prefix_reuse": c.stats["prefix_reuse"],
                    "note": f"{st['n_cases']} cases, {st['chunks']} chunks, prefix_reuse={st['prefix_reuse']} "
                            f"(cpu {c.stats['prefix_reuse']})"}
        return go

    check(group, "sweep_heads_patch", sweep("heads", "patch", src_tokens, layers=sweep_layers))
    if full:
        check(group, "sweep_heads_patch_offload", sweep("heads", "patch", src_tokens, offload=True, layers=sweep_layers))
        check(group, "sweep_heads_zero", sweep("heads", "zero", None, layers=sweep_layers))
        check(group, "sweep_heads_mean", sweep("heads", "mean", None, layers=sweep_layers))
        check(group, "sweep_positions_patch", sweep("positions", "patch", src_tokens, layers=sweep_layers))
        check(group, "sweep_positions_knockout", sweep("positions", "knockout", None, layers=sweep_layers))

    def engine_vs_direct() -> dict[str, Any]:
        m = pair.dev
        layer, head = (sweep_layers[0] if sweep_layers else la), heads[0][1]
        with torch.no_grad():
            res = run_sweep(m, Sweep("heads", "patch", layers=(layer,)), metric, tokens, src_tokens.to(m.device))
            i = res.labels.index({"layer": layer, "head": head})
            cache = m.run(src_tokens, cache=[f"z.{layer}"]).cache
            logits = m.run(tokens, interventions=[Patch(f"z.{layer}", source="clean", heads=(head,))],
                           sources={"clean": cache}).logits
            direct = metric(logits[:, -1:, :], torch.arange(n, device=m.device))
        diff, scale = _max_diff(res.values[i], direct)
        return {"diff": diff, "scale": scale, "note": "engine vs one direct Patch run, both on the device"}

    check(group, "sweep_vs_direct_patch(device)", engine_vs_direct)

    # KV-cached decoding
    def gen(fn: Callable[[Any], Any]) -> Callable[[], dict[str, Any]]:
        def go() -> dict[str, Any]:
            d, c = pair.both(fn)
            same = [x.tokens for x in d] == [x.tokens for x in c]
            diff, scale = _max_diff([x.scores for x in d], [x.scores for x in c]) if same else (float("inf"), 0.0)
            n_tok = sum(len(x.tokens) for x in d)
            return {"diff": diff, "scale": scale, "ok": same, "tokens_generated": n_tok,
                    "note": (f"{n_tok} tokens identical (diff: their scores)" if same else
                             f"TOKENS DIFFER: dev {[x.tokens for x in d]} cpu {[x.tokens for x in c]}")}
        return go

    check(group, "greedy_generate(kv)", gen(lambda m: greedy_generate(m, prompts, max_new_tokens=new_tokens)))
    if full:
        check(group, "decore_generate(kv,masked)",
              gen(lambda m: decore_generate(m, m.tokenizer, prompts, list(heads), alpha=0.5, max_new_tokens=new_tokens)))

    def kv_vs_recompute() -> dict[str, Any]:
        m = pair.dev
        prompt = list(prompts[0])
        g = greedy_generate(m, [prompt], max_new_tokens=new_tokens)[0]
        seq = list(prompt)
        ref_scores = []
        with torch.no_grad():
            for _ in range(len(g.tokens)):
                lg = m.run(torch.tensor([seq], device=m.device)).logits[0, -1].float()
                lp = torch.log_softmax(lg, -1)
                t = int(lp.argmax())
                ref_scores.append(float(lp[t]))
                seq.append(t)
        same = seq[len(prompt):] == g.tokens
        diff, scale = _max_diff(g.scores, ref_scores) if same else (float("inf"), 0.0)
        return {"diff": diff, "scale": scale, "ok": same,
                "note": "KV-cached vs full recompute, on the device" + ("" if same else
                        f"; TOKENS DIFFER: kv {g.tokens} recompute {seq[len(prompt):]}")}

    check(group, "kv_decode_vs_recompute(device)", kv_vs_recompute)


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--smollm", action="store_true", help="also check smollm2-135m with random weights")
    ap.add_argument("--out", default=None, help="write the JSON report here")
    args = ap.parse_args()

    import transformers

    import interp  # noqa: F401
    from tests.tiny import loaded, tiny_gpt2, tiny_llama

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    header: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "device": str(dev), "cuda_available": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "matmul_precision": torch.get_float32_matmul_precision(),
        "tolerance": f"max|dev-cpu| <= {TOL} * max(1, max|cpu|)",
    }
    try:
        import importlib.metadata as md

        header["transformer_lens"] = md.version("transformer-lens")
    except Exception as exc:
        header["transformer_lens"] = f"? ({exc})"
    print(json.dumps(header), flush=True)
    if dev.type == "cpu":
        print("NOTE: no CUDA device: comparing cpu with cpu (a smoke test of this script only)", flush=True)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.cat([torch.zeros(3, 1, dtype=torch.long), torch.randint(4, 128, (3, 11), generator=g)], 1)
    src = torch.cat([torch.zeros(3, 1, dtype=torch.long), torch.randint(4, 128, (3, 11), generator=g)], 1)
    prompts = [[0, 5, 9, 17, 33, 40, 41], [0, 77, 12], [0, 64, 65, 66, 70]]
    heads = [(1, 0), (2, 3)]
    builders = {"tiny_llama_gqa": tiny_llama, "tiny_gpt2": tiny_gpt2}
    for group, build in builders.items():
        try:
            pair = Pair(build(), lambda hf: loaded(hf, "bridge"), dev)
        except Exception as exc:
            check(group, "build", lambda exc=exc: (_ for _ in ()).throw(exc))
            continue
        model_checks(group, pair, tokens, src, heads, prompts, new_tokens=8)
        del pair

    if args.smollm:
        group = "smollm2_random"
        try:
            sys.path.insert(0, str(ROOT))
            from benchmarks._common import conflict_prompts, random_init_model

            base = random_init_model("smollm2-135m", device="cpu")
            hf = base.hf
            tok = base.tokenizer

            def wrap(m: torch.nn.Module) -> Any:
                from interp.model.loaded import LoadedModel, Provenance

                prov = Provenance(model_id="smollm2-135m-random-seed0", source="object", file_sha256=None,
                                  dtype="float32", device=str(next(m.parameters()).device))
                return LoadedModel(m, tok, prov, backend="bridge")  # type: ignore[arg-type]

            pair = Pair(hf, wrap, dev)
            conflict, consistent, _, _ = conflict_prompts(pair.cpu, 4)
            n_layers = pair.cpu.info.n_layers
            texts = ["The capital of France is", "Once upon a time, a young fox"]
            sm_prompts = [pair.cpu.to_tokens(t)[0].tolist() for t in texts]
        except Exception as exc:
            check(group, "build", lambda exc=exc: (_ for _ in ()).throw(exc))
        else:
            model_checks(group, pair, conflict.cpu(), consistent.cpu(), [(n_layers // 2, 0), (n_layers - 1, 8)],
                         sm_prompts, new_tokens=6, sweep_layers=(n_layers // 2, n_layers - 1), full=False)

    n_fail = sum(r["status"] != "pass" for r in RESULTS)
    summary = {"header": header, "n_checks": len(RESULTS), "n_failed": n_fail, "checks": RESULTS}
    print(f"gpu_check: {len(RESULTS) - n_fail}/{len(RESULTS)} checks passed on {dev}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1, default=str))
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
