"""Shared setup for the patching benchmarks: the conflict prompts, timing, and the plain baseline."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Country -> capital; a conflict prompt states another country's capital in context.
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("Russia", "Moscow"), ("England", "London"), ("Egypt", "Cairo"),
    ("Greece", "Athens"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Norway", "Oslo"),
    ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("China", "Beijing"), ("Canada", "Ottawa"),
    ("Sweden", "Stockholm"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Kenya", "Nairobi"),
]


# Config and tokenizer files (no weights) of the models a --random-init run builds.
RANDOM_INIT_DIR = Path(__file__).resolve().parent.parent / ".gpu"


def parse_args(doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--quick", action="store_true", help="few prompts and sites, for a smoke test")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved timing rounds (0: 2 quick, 1 full)")
    p.add_argument("--profile", action="store_true", help="print a torch profile of one engine run to stderr")
    p.add_argument(
        "--random-init", action="store_true",
        help=f"random weights (seed 0) built from the config in {RANDOM_INIT_DIR.name}/<model>/, with the real "
        "tokenizer saved there; on cuda when available (for machines without the weights)",
    )
    return p.parse_args()


def random_init_model(name: str, seed: int = 0, device: str | None = None) -> Any:
    """A LoadedModel with random weights (``torch.manual_seed(seed)``, drawn on the CPU so they
    do not depend on the device) built from ``.gpu/<name>/config.json``, and the real tokenizer
    saved beside it. ``device``: default cuda when available, else cpu."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import interp

    folder = RANDOM_INIT_DIR / name
    if not (folder / "config.json").is_file():
        raise SystemExit(
            f"--random-init needs {folder}/config.json and the tokenizer files (copy them from the "
            f"converted model folder, without the weights)"
        )
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    hf.name_or_path = f"{name}-random-seed{seed}"  # the LoadedModel's (and the bridge's) name
    tok = AutoTokenizer.from_pretrained(folder)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return interp.load_model(hf, tokenizer=tok, device=dev)


def random_init_folder(name: str, seed: int = 0) -> Path:
    """A temporary model folder (safetensors, config and tokenizer) holding the random weights of
    :func:`random_init_model`, so that other processes (Dask workers, a device map) can load the
    same model by its path. The caller removes it (``shutil.rmtree``) when done."""
    import tempfile

    source = random_init_model(name, seed=seed, device="cpu")
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-random-seed{seed}-"))
    source.hf.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    return folder


def load(name: str, random_init: bool = False) -> tuple[Any, torch.nn.Module]:
    """The LoadedModel (bridge) and an independent plain HF copy for the un-hooked baseline.

    ``random_init``: random weights from the model's config (see :func:`random_init_model`)."""
    import interp

    model = random_init_model(name) if random_init else interp.load_model(name)
    plain = copy.deepcopy(model.hf)  # before the bridge boots and rewires model.hf
    _ = model.backend
    return model, plain


def conflict_prompts(model: Any, n: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """n conflict prompts ("... is Rome. The capital of France is"), their consistent twins
    ("... is Paris. ..."), and per prompt the memory answer and the context answer token."""
    tok = model.tokenizer

    def one(word: str) -> int | None:
        ids = tok(" " + word, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    good = [(c, k) for c, k in CAPITALS if one(k) is not None]
    rows: dict[int, list[tuple[str, str, int, int]]] = {}
    for i, (country, cap) in enumerate(good):
        for j in range(1, len(good)):
            wrong = good[(i + j) % len(good)][1]
            text = f"The capital of {country} is {wrong}. The capital of {country} is"
            twin = f"The capital of {country} is {cap}. The capital of {country} is"
            length = len(model.to_tokens(text)[0])
            if len(model.to_tokens(twin)[0]) == length:
                rows.setdefault(length, []).append((text, twin, one(cap), one(wrong)))  # type: ignore[arg-type]
                break
    length, best = max(rows.items(), key=lambda kv: len(kv[1]))
    if len(best) < n:
        raise SystemExit(f"only {len(best)} equal-length conflict prompts, need {n}")
    best = best[:n]
    return (
        model.to_tokens([b[0] for b in best]),
        model.to_tokens([b[1] for b in best]),
        [b[2] for b in best],
        [b[3] for b in best],
    )


def _sync() -> None:
    # CUDA kernels run asynchronously: without this a GPU timing measures only their launches.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(
    rounds: int, engine: Callable[[], Any], baseline: Callable[[], Any], plain: Callable[[], float]
) -> tuple[list[float], list[float], list[float], Any, Any]:
    """Time engine, plain forward and baseline in turn, ``rounds`` times, so that drifts of the
    machine's speed hit all three alike. Returns their times and the last engine and baseline
    outputs."""
    engine_t: list[float] = []
    base_t: list[float] = []
    plain_t: list[float] = []
    res: Any = None
    base: Any = None
    for _ in range(rounds):
        t, res = timed(engine)
        engine_t.append(t)
        plain_t.append(plain())
        t, base = timed(baseline)
        base_t.append(t)
    return engine_t, base_t, plain_t, res, base


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def plain_forward_seconds(plain: torch.nn.Module, tokens: torch.Tensor, reps: int = 3) -> float:
    with torch.no_grad():
        plain(tokens)  # warm-up
        times = [timed(lambda: plain(tokens))[0] for _ in range(reps)]
    return statistics.median(times)


def emit(result: dict[str, Any]) -> None:
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
