"""Running detectors and keeping their results: typed configs (``config``), the registry of
detectors and commands (``registry``), the runner (``runner``), the results store (``store``:
the ``Store`` and a run's handle; ``schema``: its SQL, tables and units; ``run_keys``: what a
run is; ``store_file``: whose file a results.db is) and its long tables (``tables``), typed
units (``units``), head scores (``head_scores``, ``heads``), and where units are computed (``executors``, ``dask_executor``).

May import ``interp.model``, ``interp.patching``, ``interp.stats`` and ``interp.errors``; never the front (CLI,
figures) or a plug-in.
"""
