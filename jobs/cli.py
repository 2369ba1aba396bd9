"""Shared plumbing for the entry points: one-line errors and exit codes, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.errors import ModelLoadError, UserError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

USER_ERRORS = (ConfigError, ModelLoadError, UserError)


def fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def existing_parent(out: Path, prefix: str = "") -> Path | None:
    """The nearest existing folder above an output path; a file in the way is one line (exit 2)."""
    parent = next((p for p in out.resolve().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"{prefix}--output {out}: {parent} is a file, not a folder")
    return parent


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run ``main`` and turn user errors and Ctrl-C into one line and an exit code."""
    try:
        code = main(argv)
    except USER_ERRORS as err:
        code = fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except KeyboardInterrupt:
        code = fail("interrupted", 130)
    sys.exit(code)
