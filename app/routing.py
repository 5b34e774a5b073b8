"""Which page of the dashboard shows a run, decided by what its detector declares.

A registered detector declares its ``output`` (``OutputKind``) and whether it studies knowledge
conflicts (``knowledge_conflict``); the pages list a run by these, never by its detector's name,
so a plug-in detector shows on the page its output calls for. A run of a detector this
installation no longer has is routed by the output its ``settings`` artifact recorded when it
ran (runs stored before that was recorded have none, and go where an unknown output goes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from interp.runs.registry import Detector


@dataclass(frozen=True)
class Route:
    """What routes a run: its detector's declared output (None where unknown) and whether it
    studies knowledge conflicts."""

    output: str | None
    knowledge_conflict: bool = False

    @classmethod
    def of(cls, detector: type[Detector[Any]]) -> Route:
        return cls(str(detector.output), bool(detector.knowledge_conflict))


UNKNOWN = Route(None)


@dataclass(frozen=True)
class Page:
    """A page of the dashboard: what it shows, which stored runs it lists, what fills it.

    ``accepts(route)`` decides whether a run is listed on the page. The pages filter their runs
    with it, the Home page's caption and a test read it: after ``interp scan`` every page must
    list a run of the default scan."""

    title: str
    shows: str
    fill: str  # the command that fills it beyond the scan
    accepts: Callable[[Route], bool]

    def detectors(self, routes: Mapping[str, Route]) -> list[str]:
        """The detectors (name -> route) whose runs the page lists."""
        return [name for name, route in routes.items() if self.accepts(route)]


PAGES: dict[str, Page] = {
    "Head maps": Page(
        "Head maps", "layer x head heatmaps of head detectors; a head's scores, curves and attention",
        "`interp run <detector>`",
        # Head detectors, plus runs whose output is unknown (their tables decide what shows).
        lambda route: (route.output or "head_scores") == "head_scores"),
    "Causal tracing": Page(
        "Causal tracing", "ROME token x layer maps of known facts, bucket averages, live tracing",
        "`interp run causal-trace --limit N`",
        lambda route: route.output == "token_layer"),
    "Conflicts": Page(
        "Conflicts", "memory/context rates and memory vs context heads; PH3, DeCoRe and the other "
        "interventions, stored and live",
        "`interp run conflict-heads`, `interp run ph3`, `interp run decore-eval`",
        lambda route: route.knowledge_conflict or route.output == "intervention"),
    "Compare": Page(
        "Compare", "one detector across two runs or models, heads placed by relative depth",
        "the same detector on another model or with other parameters",
        lambda route: True),
}


# Not one of PAGES: `interp scan` runs no edge detector, and every page of PAGES lists a run of
# the default scan (tests/unit/test_default_scan.py). Run links still open it (run_url).
CIRCUITS = Page(
    "Circuits", "a run's edges drawn as a graph (layer x head, MLPs in a row, logits on the right); "
    "its heads open in Head maps",
    "`interp run path-patching`, `interp run circuit`",
    lambda route: route.output == "edges")


def declared_routes() -> dict[str, Route]:
    """Each registered detector's route ({} when the detector modules fail to load: the pages
    then list runs by what their settings recorded)."""
    from interp.runs.registry import all_detectors

    try:
        return {name: Route.of(cls) for name, cls in all_detectors().items()}
    except Exception:  # a broken plug-in module must not take the pages down
        return {}


def route_of(detector: str, routes: Mapping[str, Route], settings: Mapping[str, Any]) -> Route:
    """The route of a run of ``detector``: the registered detector's, else the output recorded
    in the run's settings artifact (``settings``), else unknown."""
    if detector in routes:
        return routes[detector]
    output = settings.get("output")
    return Route(str(output)) if isinstance(output, str) else UNKNOWN


def page_lines(detectors: Mapping[str, type[Detector[Any]]]) -> list[str]:
    """One line per page for the Home page: what it shows and which command fills it, with the
    default-scan detectors it lists and their scan parameters (``detectors``: name -> class)."""
    routes = {name: Route.of(cls) for name, cls in detectors.items()}
    n_scanned = sum(bool(d.in_default_scan) for d in detectors.values())
    lines = []
    for page in PAGES.values():
        scanned = [n for n in page.detectors(routes) if detectors[n].in_default_scan]
        parts = [n + (": " + ", ".join(f"{k} {v}" for k, v in detectors[n].scan_params.items())
                      if detectors[n].scan_params else "") for n in scanned]
        if len(scanned) > 1 and len(scanned) == n_scanned:
            parts = ["any of its detectors"]
        scan = f"`interp scan` ({'; '.join(parts)})" if parts else "not filled by `interp scan`"
        lines.append(f"**{page.title}**: {page.shows} — {scan} or {page.fill}")
    return lines


def run_url(route: Route, run_id: int) -> str:
    """The relative URL of the page that shows a run with this route (the first page listing
    it, Compare aside; the Home page's run details otherwise), with the run preselected."""
    for page in (*PAGES.values(), CIRCUITS):
        if page.title != "Compare" and page.accepts(route):
            return f"./{page.title.replace(' ', '_')}?run={run_id}"
    return f"./?run={run_id}"
