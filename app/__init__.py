"""The Streamlit dashboard: a view over the store and the detectors of ``interp`` and its
plug-ins (Home.py and pages/ are Streamlit scripts; dashboard, routing, progress, jobs, uploads
and launch are modules they import as ``app.*``). Nothing in ``interp`` imports it: ``interp app``
is registered through the ``interp.plugins`` entry point (launch.py)."""
