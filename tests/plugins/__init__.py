"""Detectors that live outside ``circuits/``: what a user's own package would ship."""

from pathlib import Path


def install(site: Path, distribution: str, module: str) -> Path:
    """Install ``module`` as a package would: a dist-info folder in ``site`` whose
    ``interp.plugins`` entry point names it. Put ``site`` on a process's path (PYTHONPATH for a
    CLI or the dashboard's server) and that process finds the module's detectors; returns
    ``site``."""
    dist = site / f"{distribution.replace('-', '_')}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[interp.plugins]\n{distribution} = {module}\n")
    return site
