"""User-facing errors: the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (model name, index, file, argument): never a traceback."""

    exit_code = 2


class ModelNotAvailableError(UserError):
    """A model could not be located, fetched or verified."""


class StoreError(UserError):
    """The results store cannot be opened or written."""
