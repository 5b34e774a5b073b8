"""Shared fixtures: tiny in-process models (unit tier) and the zoo default (integration tier).

The zoo default is loaded once per session; integration tests are skipped with
INTERP_SKIP_INTEGRATION=1 (they never need the network: the zoo comes from PyPI).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from interp.model.loaded import LoadedModel
from tests.tiny import loaded, one_thread, save_folder, tiny_gemma3, tiny_gpt2, tiny_llama, tiny_qwen2

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TESTS = Path(__file__).resolve().parent
# The tiers outside the tight loop (pytest -m "not slow"), and the markers of unit tests that
# start clusters or processes.
SLOW_TIERS = ("integration", "notebooks", "browser", "gpu")
SLOW_MARKERS = ("dask", "subprocess", "zoo")
# The tiny family the tight loop keeps (a test parametrized by family, through the tiny_hf
# fixture or its own parameter): Llama has grouped-query attention, the case most code paths
# branch on; the other families run in the full suite.
LOOP_FAMILY = "llama"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``slow`` what the tight loop leaves out (the markers are declared in pyproject.toml)."""
    for item in items:
        path = Path(str(item.path)).resolve()
        tier = path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else ""
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        other_family = any(isinstance(v, str) and v in TINY_FAMILIES and v != LOOP_FAMILY for v in params)
        if (tier in SLOW_TIERS or other_family
                or any(item.get_closest_marker(m) is not None for m in SLOW_MARKERS)):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_llama_hf() -> torch.nn.Module:
    """A Llama-style model with grouped-query attention (4 query heads on 2 kv heads). Do not
    mutate: wrap a deepcopy (the bridge backend rewires the module tree it is given)."""
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_gpt2_hf() -> torch.nn.Module:
    return tiny_gpt2()


@pytest.fixture(scope="session")
def tiny_gemma3_hf() -> torch.nn.Module:
    """Gemma 3: sliding and global layers, one kv head, QK-norm, (1 + w) norms, post norms."""
    return tiny_gemma3()


@pytest.fixture(scope="session")
def tiny_qwen2_hf() -> torch.nn.Module:
    """Qwen2: 4 query heads on 2 kv heads, non-zero q/k/v biases."""
    return tiny_qwen2()


@pytest.fixture(autouse=True)
def _real_main() -> Iterator[None]:
    """Streamlit's AppTest installs each page it runs as ``__main__`` and leaves it there. A later
    test that spawns processes (a Dask cluster, whose nanny also respawns a killed worker) would
    re-run that page in each of them: put the real ``__main__`` back after every test."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


TINY_FAMILIES = ("llama", "gpt2", "gemma3", "qwen2")


@pytest.fixture(params=TINY_FAMILIES)
def tiny_hf(request: pytest.FixtureRequest) -> torch.nn.Module:
    """Each tiny family in turn (the session fixture of that name)."""
    return request.getfixturevalue(f"tiny_{request.param}_hf")


@pytest.fixture
def tiny_model(tiny_hf: torch.nn.Module) -> LoadedModel:
    """A fresh bridge-backed LoadedModel over a copy of each tiny model."""
    return loaded(copy.deepcopy(tiny_hf), "bridge")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved as a local HF folder: a model the CLI loads in a second."""
    return save_folder(tiny_llama(), tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    """The zoo default, smollm2-135m, bridge backend, loaded once per test session."""
    if os.environ.get("INTERP_SKIP_INTEGRATION"):
        pytest.skip("INTERP_SKIP_INTEGRATION is set")
    import interp

    return interp.load_model("smollm2-135m")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a whole module (``pytestmark = pytest.mark.usefixtures(...)``)."""
    with one_thread():
        yield
