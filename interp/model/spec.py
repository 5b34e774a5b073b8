"""How to load a model again in another process (a cluster worker): :class:`ModelSpec`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model again in another process: the arguments of :func:`interp.load_model`
    (:func:`interp.model.load.load_spec` loads it).

    Attributes:
        name: a zoo name, a local folder or a hub id (a model passed as an object has no spec).
        backend: the hook backend.
        prefix: the prompt-prefix choice (``auto``, ``none`` or a token's text).
        device: the device the model was asked for (``auto`` resolved per process).
        dtype: the dtype name.
        device_map: accelerate's placement (``auto``), or None for one device.
        max_memory: per-device memory limits for ``device_map`` ("cuda:0=10GiB,cpu=60GiB"), or None.
    """

    name: str
    backend: str = "bridge"
    prefix: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    device_map: str | None = None
    max_memory: str | None = None
