"""Running detectors and keeping their results: typed configs (``config``), the registry of
detectors and commands (``registry``), the runner (``runner``), the results store and its long
tables (``store``, ``tables``), and where units are computed (``executors``, ``dask_executor``).

May import ``interp.model``, ``interp.patching`` and ``interp.errors``; never the front (CLI,
figures) or a plug-in.
"""
