"""Devices, dtypes and device maps from the CLI: checked before anything is created, stored with
each run, and keyed so that float32 and bfloat16 results never resume into each other."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from interp.errors import UserError
from interp.model.loading import Placement, parse_device, parse_max_memory
from interp.runs.run_keys import run_key
from interp.runs.store import Store
from tests.tiny import run_cli

RUN = ["run", "induction", "--seq-len", "8", "--n-prompts", "4", "--batch-size", "2", "--json"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--device", "cuda"], "CUDA is not available"),
        (["--device", "cuda:3"], "CUDA"),
        (["--device", "tpu-ish"], "unknown device 'tpu-ish'"),
        (["--dtype", "float8"], "unknown dtype 'float8'"),
        (["--device-map", "everywhere"], "unknown device map 'everywhere'"),
        (["--max-memory", "cpu=1GiB"], "give --device-map auto with it"),
        (["--device-map", "auto", "--max-memory", "gpu0=1GiB"], "unknown device 'gpu0'"),
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "not both"),
    ],
)
def test_bad_placement_is_one_line_and_creates_nothing(
    extra: list[str], needle: str, tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "cuda" in " ".join(extra) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ws = tmp_path / "ws"
    code, out, err = run_cli(capsys, [*RUN, "-m", str(tiny_folder), "-w", str(ws), *extra])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0
    assert len(lines) == 1, err
    assert needle in lines[0], err
    assert not ws.exists()
    assert out == ""


def test_auto_device_is_cuda_when_present_else_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert parse_device("auto").type == expected


def test_max_memory_in_accelerate_form(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_max_memory("cpu=60GiB,disk=1.5GB") == {"cpu": "60GiB", "disk": "1.5GB"}
    assert parse_max_memory(None) is None
    # GPUs are named by index; the CUDA queries are stood in for on a machine without one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_max_memory("cuda:0=10GiB, 1=12GiB,cpu=60GiB") == {0: "10GiB", 1: "12GiB", "cpu": "60GiB"}
    with pytest.raises(UserError, match=r"cuda:2 names a GPU this machine lacks \(it has 2\)"):
        parse_max_memory("cuda:2=10GiB")
    monkeypatch.undo()
    with pytest.raises(UserError, match="has no limit"):
        parse_max_memory("cuda:0")
    kw = Placement.parse("cpu", "bf16", "auto", "cpu=1GiB").pretrained_kwargs()
    assert kw == {"dtype": torch.bfloat16, "attn_implementation": "eager", "device_map": "auto",
                  "max_memory": {"cpu": "1GiB"}}


def test_float32_and_bfloat16_runs_are_separate_and_stored_with_their_dtype(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "ws"
    results = {}
    for dtype in ("float32", "bfloat16", "float32"):
        code, out, err = run_cli(capsys, [*RUN, "-m", str(tiny_folder), "-w", str(ws), "--dtype", dtype,
                                          "--device", "cpu"])
        assert code == 0, err
        results.setdefault(dtype, []).append(json.loads(out))
    with Store(ws) as s:
        runs = s.runs().sort_values("id")
    keys = list(runs["key"])
    dtypes = [json.loads(p)["dtype"] for p in runs["provenance_json"]]
    assert dtypes == ["torch.float32", "torch.bfloat16", "torch.float32"]
    # The two float32 runs share a key (asking again is a rerun of the same thing); bf16's differs.
    assert keys[0] == keys[2] != keys[1]
    # float32 keys are the keys of runs stored before dtypes were keyed.
    base = {"model": "m", "model_hash": "h", "detector": "d", "variant": "v", "params": {}, "dataset_hash": None,
            "seed": 0}
    assert run_key(**base) == run_key(**base, dtype="torch.float32") != run_key(**base, dtype="torch.bfloat16")
    # bfloat16 scores are close to float32's but not equal: the dtype really changed the computation.
    f32 = {(h["layer"], h["head"]): h["score"] for h in results["float32"][0]["heads"]}
    b16 = {(h["layer"], h["head"]): h["score"] for h in results["bfloat16"][0]["heads"]}
    assert f32.keys() == b16.keys()
    assert max(abs(f32[k] - b16[k]) for k in f32) < 0.05
    assert f32 != b16


def test_a_device_map_on_this_machine_gives_the_same_scores(tiny_folder: Path) -> None:
    """On a CPU-only machine ``--device-map auto`` puts every layer on the CPU through accelerate's
    loading path: the scores must equal a plain load's (the split over several devices needs a
    GPU machine: benchmarks/gpu_check.sh)."""
    import interp
    from interp.runs.registry import get_detector
    from interp.runs.runner import run_in_memory

    params = {"seq_len": 8, "n_prompts": 4, "batch_size": 2}
    plain = run_in_memory(interp.load_model(str(tiny_folder), device="cpu"), get_detector("induction"), params)[0]
    mapped_model = interp.load_model(str(tiny_folder), device="cpu", device_map="auto", max_memory="cpu=8GiB")
    assert mapped_model.spec is not None
    assert mapped_model.spec.device_map == "auto"
    mapped = run_in_memory(mapped_model, get_detector("induction"), params)[0]
    assert [h["score"] for h in mapped.heads or []] == [h["score"] for h in plain.heads or []]


def test_local_gpu_workers_get_one_gpu_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which GPU each local Dask worker loads its copy on, and the refusals of shared GPUs. The
    CUDA queries are stood in for (this machine has no GPU); what runs on a real one is
    tests/gpu and benchmarks/scaling.py --device cuda on the GPU machine."""
    from interp.model.spec import ModelSpec
    from interp.runs.dask_executor import local_gpu_devices

    assert local_gpu_devices(ModelSpec("m", device="cpu"), 4) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert local_gpu_devices(ModelSpec("m", device="cuda"), 3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert local_gpu_devices(ModelSpec("m", device="auto"), 2) == ["cuda:0", "cuda:1"]
    assert local_gpu_devices(ModelSpec("m", device="cuda:2"), 1) == ["cuda:2"]
    assert local_gpu_devices(ModelSpec("m", device="cuda", device_map="auto"), 1) is None
    for spec, workers, needle in [
        (ModelSpec("m", device="cuda"), 5, "needs a GPU per worker; this machine has 4"),
        (ModelSpec("m", device="cuda:1"), 2, "puts every worker on that one GPU"),
        (ModelSpec("m", device="cuda", device_map="auto"), 2, "start one local worker"),
    ]:
        with pytest.raises(UserError, match=needle):
            local_gpu_devices(spec, workers)


def test_detectors_read_weights_that_a_device_map_offloaded(tiny_llama_hf: torch.nn.Module) -> None:
    """A device map's CPU part is offloaded: accelerate keeps those parameters on the meta device
    and loads them at each forward. Detectors that read weights (copying's OV circuit, the
    engine's two-token unembedding) must read the offloaded values; on the GPU machine the
    copying detector failed on them ("Tensor on device cpu is not on the expected device meta").
    Offloading the later layers and the unembedding here gives the same scores as the plain model."""
    import copy

    import accelerate

    from interp.runs.registry import get_detector
    from interp.runs.runner import run_in_memory
    from tests.tiny import loaded

    offloaded = copy.deepcopy(tiny_llama_hf)
    for module in [*offloaded.model.layers[1:], offloaded.lm_head]:
        accelerate.cpu_offload(module, execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in offloaded.parameters())
    plain, split = loaded(copy.deepcopy(tiny_llama_hf), "nnsight"), loaded(offloaded, "nnsight")
    fact = {"prompt": "w5 w9 w17 w23 w40 w41 w7 w8", "subject": "w17 w23 w40", "answer": "w11", "samples": 2,
            "kinds": "state", "window": 2}
    for name, raw in [("copying", {"seq_len": 10, "n_prompts": 2}),
                      ("induction", {"seq_len": 8, "n_prompts": 4, "batch_size": 2}), ("causal-trace", fact)]:
        a, b = run_in_memory(plain, get_detector(name), raw), run_in_memory(split, get_detector(name), raw)
        for table, frame in a[1].items():
            pd.testing.assert_frame_equal(b[1][table], frame, obj=f"{name} {table}")
