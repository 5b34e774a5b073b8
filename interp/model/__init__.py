"""The model and what acts on it: loading (zoo, local folders, the hub), the architecture layout,
the hook backends, named sites, interventions and the prompt prefix.

May import ``interp.errors`` and each other; never ``interp.patching``, ``interp.runs`` or the
front (CLI, figures). ``interp.load_model`` is the public entry point.
"""
