"""Every detector stores the same results with the model on a GPU as on the CPU (the GPU tier).

Skipped where CUDA is absent, as in CI; on a machine with a GPU: ``pytest tests/gpu``
(benchmarks/gpu_scale.sh runs it on the GPU machine). Each detector runs with the unit tier's
small parameters on the tiny Llama, built twice from the same seed, once left on the CPU and
once moved to cuda: the conflict detectors on facts the tiny model knows (its own top-1
answers), retrieval on a model that always says the needle, DeCoRe on given heads. Every table
of every unit is compared: keys and texts equal, numbers within 1e-4 (fp32; the GPU's kernels
round differently). A CPU tensor meeting a model output on the GPU fails here with torch's
device error: the bug this tier exists for (two detectors had it when first run on an H200).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from circuits.data import conflicts
from circuits.detectors import cmr
from circuits.methods.cmr_model import GridSpec
from interp.model.loaded import LoadedModel
from interp.runs.registry import all_detectors, get_detector
from interp.runs.runner import run_in_memory
from tests.known_facts import own_answer_facts
from tests.tiny import loaded, tiny_llama
from tests.unit.test_retrieval import GRID, HAYSTACK_TEXT, NEEDLE, force_output, wrap

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier needs CUDA")]

ATOL = 1e-4
FACT = {"prompt": "w5 w9 w17 w23 w40 w41 w7 w8", "subject": "w17 w23 w40", "answer": "w11"}
LAG = {"seq_len": 12, "n_prompts": 2, "batch_size": 2, "max_lag": 4}

Build = Callable[[str], LoadedModel]


def _tiny(device: str) -> LoadedModel:
    return loaded(tiny_llama().to(device))


def _needle_model(device: str) -> LoadedModel:
    return wrap(force_output(tiny_llama()).to(device))


def _needles(tmp: Path) -> dict[str, str]:
    (tmp / "hay.txt").write_text(HAYSTACK_TEXT)
    (tmp / "needles.jsonl").write_text(json.dumps(NEEDLE) + "\n")
    return {"haystack_file": str(tmp / "hay.txt"), "needles_file": str(tmp / "needles.jsonl")}


def _knowing(mp: pytest.MonkeyPatch) -> None:
    facts = own_answer_facts(_tiny("cpu"), 24)
    mp.setattr(conflicts, "load_facts", lambda source=None: list(facts))


def _small_cmr_grid(mp: pytest.MonkeyPatch) -> None:
    small = GridSpec(beta_enc=(0.5,), beta_rec=(0.0, 0.5), gamma_ft=(0.0, 0.5), n_items=20, n_starts=2)
    mp.setattr(cmr, "grid_spec", lambda params: small)


def _case(name: str, tmp: Path, mp: pytest.MonkeyPatch) -> tuple[Build, dict[str, Any]]:
    """The model builder and the parameters of one detector's run."""
    if name == "retrieval":
        return _needle_model, {**_needles(tmp), **GRID, "min_counted": 1}
    if name == "retrieval-masking":
        return _needle_model, {**_needles(tmp), **GRID, "heads": "1.2,0.1,2.3,0.0", "top_k": 2, "n_random": 1,
                               "exclude_top": 4}
    if name == "conflict-heads":
        _knowing(mp)
        return _tiny, {"max_items": 8, "formats": "restated", "total_effect": True, "total_items": 2, "n_top": 2}
    if name == "ph3":
        _knowing(mp)
        return _tiny, {"max_items": 8, "formats": "restated", "ks": "1", "factors": "0,2"}
    if name == "decore-eval":
        return _tiny, {"heads": "1.0,2.3", "ks": "2,1", "tasks": "memotrap", "max_items": 2}
    if name == "cmr":
        _small_cmr_grid(mp)
        return _tiny, {**LAG, "lists": "repeated", "fit_lag": 2}
    if name == "lag-crp":
        return _tiny, {**LAG, "lists": "repeated"}
    if name == "episodic-ablation":
        return _tiny, {"score": "induction", "k": 1, "n_draws": 1, "seq_len": 64, "late": 50, "early": 10,
                       "window": 5, "n_single": 0, "cum_sizes": "", "rep_len": 10, "rep_prompts": 2, "n_texts": 1}
    if name == "attention-knockout":
        return _tiny, {**FACT, "window": 2}
    if name == "causal-trace":
        return _tiny, {**FACT, "samples": 2, "kinds": "state,mlp,attn", "window": 2}
    if name == "induction":
        return _tiny, {"seq_len": 8, "n_prompts": 4, "batch_size": 2}
    if name == "copying":
        return _tiny, {"seq_len": 10, "n_prompts": 2}
    raise KeyError(name)


def _timing(key: object) -> bool:
    """Keys of run times, which differ between any two runs."""
    return "seconds" in str(key)


def _close(a: Any, b: Any, where: str) -> list[str]:
    """Differences between two JSON-like values: numbers beyond ATOL, anything else unequal."""
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        if math.isnan(a) and math.isnan(b):
            return []
        return [] if abs(a - b) <= ATOL else [f"{where}: {a} vs {b}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for k in a if not _timing(k) for d in _close(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _close(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def _table_diffs(table: str, cpu: pd.DataFrame, gpu: pd.DataFrame) -> list[str]:
    if list(cpu.columns) != list(gpu.columns) or len(cpu) != len(gpu):
        return [f"{table}: shape {cpu.shape} vs {gpu.shape}"]
    if "name" in cpu.columns:
        keep = ~cpu["name"].astype(str).map(_timing)
        cpu, gpu = cpu[keep], gpu[keep.to_numpy()]
    out = []
    for col in cpu.columns:
        a, b = cpu[col].tolist(), gpu[col].tolist()
        if table.endswith("artifacts") and col == "json":
            a, b = [json.loads(x) for x in a], [json.loads(x) for x in b]
        out += _close(a, b, f"{table}.{col}")
    return out


@pytest.mark.parametrize("name", sorted(all_detectors()))
def test_detector_on_cuda_equals_cpu(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build, raw = _case(name, tmp_path, monkeypatch)
    cfg = get_detector(name).parse_params(raw)
    runs = {}
    for device in ("cpu", "cuda"):
        monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path / device))  # each computes its own CMR grid
        runs[device] = run_in_memory(build(device), get_detector(name), cfg)
    (cpu_summary, cpu), (gpu_summary, gpu) = runs["cpu"], runs["cuda"]
    assert cpu.keys() == gpu.keys()
    diffs = [d for t in cpu for d in _table_diffs(t, cpu[t], gpu[t])]
    diffs += _close(cpu_summary.metrics, gpu_summary.metrics, "summary.metrics")
    diffs += _close(cpu_summary.heads, gpu_summary.heads, "summary.heads")
    assert cpu_summary.tables.keys() == gpu_summary.tables.keys()
    diffs += [d for t in cpu_summary.tables for d in _table_diffs(f"final.{t}", cpu_summary.tables[t],
                                                                   gpu_summary.tables[t])]
    assert not diffs, f"{name}: {len(diffs)} differences, first: {diffs[:8]}"
