"""Detectors and interventions of the papers, registered with :mod:`interp.runs.registry`.

- ``detectors/``: one module per paper or method, each registering its detectors;
- ``methods/``: the shared methods they build on (decoding, DeCoRe generation, head lists, the
  CMR model, causal-tracing and direct-path computations);
- ``data/``: the data sets (facts, needles, conflicts, texts) with their loaders;
- ``commands/``: the extra CLI commands (``interp decore``, ``interp prune``);
- ``atlas/``: the workflow that runs detectors over several models and checks the papers' claims.

Importing this package registers them (the ``interp.plugins`` entry point in pyproject.toml
names it, so the core never imports it by name). Everything here may import ``interp``;
nothing in ``interp`` imports this package.
"""

from circuits import atlas, commands, detectors

__all__ = ["atlas", "commands", "detectors"]
