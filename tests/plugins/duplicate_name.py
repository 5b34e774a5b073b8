"""A plug-in that registers a detector under a name the workbench already has."""

from __future__ import annotations

from dataclasses import dataclass

from interp.runs.config import DetectorConfig
from interp.runs.registry import Detector, register


@dataclass(frozen=True)
class _Config(DetectorConfig):
    pass


@register
class AnotherInduction(Detector[_Config]):
    name = "induction"
    description = "a second detector named induction"
    output = "metrics"
    Config = _Config
