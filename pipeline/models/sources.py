"""Where a model comes from: a local folder (``~`` and ``$VARS`` expanded) or a hub id ("org/name")."""

from __future__ import annotations

import os
from pathlib import Path


def expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def is_local_path(source: str) -> bool:
    """A folder rather than a hub id ("org/name")."""
    return source.startswith(("/", "~", ".", "$")) or source.count("/") > 1 or Path(expand(source)).exists()
