"""The ``negmerge`` command: a thin typer app over the library, with one error boundary."""

from __future__ import annotations

import os
import sys

from negmerge_cli.errors import ConfigError, Interrupted, NegmergeError

DEBUG_VARIABLE = "NEGMERGE_DEBUG"


def exit_code(exc: NegmergeError) -> int:
    """1 for failures, 2 for invalid configuration (a usage error), 130 for interrupts."""
    if isinstance(exc, Interrupted):
        return 130
    return 2 if isinstance(exc, ConfigError) else 1


def main(argv: list[str] | None = None) -> None:
    """Run the app; known errors become one line on stderr and a non-zero exit."""
    from negmerge_cli.cli.app import app

    try:
        app(args=argv, prog_name="negmerge")
    except NegmergeError as exc:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        hint = "" if isinstance(exc, ConfigError) else f" (set {DEBUG_VARIABLE}=1 for a traceback)"
        print(f"negmerge: error: {exc}{hint}", file=sys.stderr)
        sys.exit(exit_code(exc))
