"""A plug-in with a bug at import: it registers a detector, then raises."""

from __future__ import annotations

from dataclasses import dataclass

from interp.runs.config import DetectorConfig
from interp.runs.registry import Detector, register


@dataclass(frozen=True)
class _Config(DetectorConfig):
    pass


@register
class HalfRegistered(Detector[_Config]):
    name = "half-registered"
    description = "registered by a plug-in that then fails to import"
    output = "metrics"
    Config = _Config


raise RuntimeError("this plug-in has a bug at import")
