"""Shared fixtures: tiny in-process models (unit tier) and the zoo default (integration tier).

The zoo default is loaded once per session; integration tests are skipped with
INTERP_SKIP_INTEGRATION=1 (they never need the network: the zoo comes from PyPI).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from interp.model import LoadedModel
from tests.tiny import loaded, tiny_gpt2, tiny_llama

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llama_hf() -> torch.nn.Module:
    """A Llama-style model with grouped-query attention (4 query heads on 2 kv heads). Do not
    mutate: wrap a deepcopy (the bridge backend rewires the module tree it is given)."""
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_gpt2_hf() -> torch.nn.Module:
    return tiny_gpt2()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_hf(request: pytest.FixtureRequest, tiny_llama_hf: torch.nn.Module, tiny_gpt2_hf: torch.nn.Module) -> torch.nn.Module:
    return tiny_llama_hf if request.param == "llama" else tiny_gpt2_hf


@pytest.fixture
def tiny_model(tiny_hf: torch.nn.Module) -> LoadedModel:
    """A fresh bridge-backed LoadedModel over a copy of each tiny model."""
    return loaded(copy.deepcopy(tiny_hf), "bridge")


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    """The zoo default, smollm2-135m, bridge backend, loaded once per test session."""
    if os.environ.get("INTERP_SKIP_INTEGRATION"):
        pytest.skip("INTERP_SKIP_INTEGRATION is set")
    import interp

    return interp.load_model("smollm2-135m")
