"""SIGINT/SIGTERM become Interrupted, and the process exits with the code we choose."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Run with ``python -m`` as the console script's users do. A KeyboardInterrupt that
# escapes an ``exec`` of a string (dataclasses and many imports do that) leaves CPython
# 3.11 a flag that, at exit, replaces the exit code by death by SIGINT even when the
# exception was caught: a sweep stopped by SIGTERM exited -2 instead of 130 now and then.
PROGRAM = """
import os, signal, sys
from negmerge_cli.errors import Interrupted
from negmerge_cli.signals import interrupts_raise
try:
    with interrupts_raise("stopped by {signal}"):
        exec("os.kill(os.getpid(), signal.%s)\\nimport time\\ntime.sleep(5)")
except Interrupted as exc:
    print(exc)
    sys.exit(3)
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_inside_exec_still_exits_with_the_code_chosen(tmp_path: Path, name: str):
    (tmp_path / "stopped.py").write_text(PROGRAM % name)
    proc = subprocess.run(
        [sys.executable, "-m", "stopped"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout.strip()) == (3, f"stopped by {name}"), proc.stderr


def test_handlers_are_restored_after_the_block():
    from negmerge_cli.signals import interrupts_raise

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with interrupts_raise("x"):
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in before} == before
