"""The engine's automatic memory budget against hand-worked numbers (issue 27): a quarter of the
free memory of the tightest device that holds the model, and the cases per chunk it allows.

The free memory of a device is the machine's; it is stood in for here (as the CUDA queries are
elsewhere) so that the numbers are fixed: 8 GiB on the CPU, 1 GiB on the second device.
"""

from __future__ import annotations

import copy

import pytest
import torch

from interp.model.loaded import LoadedModel
from interp.patching import memory
from interp.patching.memory import bytes_per_row, default_budget
from interp.patching.metrics import LogitDiff
from interp.patching.planning import plan_sweep
from interp.patching.sweeps import Sweep
from tests.tiny import loaded

GIB = 1 << 30
FREE = {"cpu": 8 * GIB, "meta": 1 * GIB}


@pytest.fixture
def free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: FREE[device.type])


def test_bytes_per_row_of_the_tiny_llama_by_hand(tiny_llama_hf: torch.nn.Module) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf))
    # d_model 64, d_mlp 128, 4 heads (2 kv heads of 16), 3 layers, vocab 128, float32 (4 bytes).
    # Per token over 7 tokens: 10 * 64 + 4 * 128 + 3 * 4 * 7 = 1236, with keys and values of every
    # layer 2 * 3 * 2 * 16 = 192 more: 1428. Row: 4 * (7 * 1428 + 3 * 1 * 128) = 41520 bytes.
    assert bytes_per_row(model, 7, 1, kv=True) == 41520
    assert bytes_per_row(model, 7, 1, kv=False) == 4 * (7 * 1236 + 3 * 128)


def test_the_budget_is_a_quarter_of_the_tightest_device(free: None, tiny_llama_hf: torch.nn.Module) -> None:
    model: LoadedModel = loaded(copy.deepcopy(tiny_llama_hf))
    assert default_budget(model) == 2 * GIB  # 8 GiB free on the CPU
    model.hf.lm_head.weight = torch.nn.Parameter(torch.empty(128, 64, device="meta"))  # a second device
    assert default_budget(model) == GIB // 4  # the tighter one: 1 GiB free


def test_a_sweep_without_a_budget_plans_with_the_automatic_one(free: None, tiny_llama_hf: torch.nn.Module) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf))
    tokens = torch.randint(4, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    source = torch.randint(4, 128, (3, 7), generator=torch.Generator().manual_seed(2))
    plan = plan_sweep(model, Sweep("heads"), LogitDiff((5, 6, 7), (8, 9, 10)), tokens, source)
    assert plan.budget_bytes == 2 * GIB
    assert plan.bytes_per_case == 3 * 41520  # 3 prompts of the row above
    # 2 GiB / 124560 bytes = 17240.9: 17240 cases would fit in a chunk; the sweep's 12 (3 layers x
    # 4 heads) all fit, in one chunk per layer the prefix is reused from.
    assert plan.max_per_chunk == 17240
    assert sum(len(c.cases) for c in plan.chunks) == 12
