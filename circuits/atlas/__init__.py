"""The atlas: detectors over several models in one workspace, and the papers' claims per model.

``claims`` computes the verdicts from finished runs; ``budget`` says what each claim's sample can
decide and what it would need; ``workflow`` runs the detectors and registers
``interp atlas``; ``stored`` writes its result as a run of the store and reads it back. May import ``interp``, the detectors and the methods.
"""

from circuits.atlas import workflow

__all__ = ["workflow"]
