"""Errors a user can cause. Entry points print ``str(err)`` (one line) and exit 2."""

from __future__ import annotations


class UserError(Exception):
    """A usage, input-file or environment problem; the message is one line that says what to do."""


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; ``str(err)`` is one line saying how to provide it."""
