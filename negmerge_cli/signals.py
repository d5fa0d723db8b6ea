"""SIGINT and SIGTERM as an :class:`Interrupted` exception, so that clean-up runs.

Why not Python's default ``KeyboardInterrupt``: CPython up to 3.11 remembers a
``KeyboardInterrupt`` raised while ``exec`` runs a string (``dataclasses`` and many imports
do that) and, at exit, kills the process with SIGINT even though the exception was caught
and handled, so the documented exit code 130 turned into "killed by SIGINT" now and then.
An exception of our own carries no such memory.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from negmerge_cli.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_raise(message: str) -> Iterator[None]:
    """Within the block SIGINT/SIGTERM raise ``Interrupted(message)`` (``{signal}`` in the
    message is replaced by the signal's name). Outside the main thread, where handlers
    cannot be installed, the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(message.replace("{signal}", signal.Signals(signum).name))

    previous = {signum: signal.signal(signum, interrupt) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
