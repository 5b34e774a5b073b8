"""Detectors that live outside ``circuits/``: what a user's own package would ship."""
