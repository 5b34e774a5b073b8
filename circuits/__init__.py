"""Detectors and interventions of the papers, one module each, registered with interp.registry."""
