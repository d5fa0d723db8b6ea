"""One exception tree for everything negmerge reports to a user.

The CLI turns a :class:`NegmergeError` into one line on stderr and exit status 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class NegmergeError(Exception):
    """Base class: a problem the user can fix, reported as one line."""


class CheckpointError(NegmergeError):
    """A checkpoint cannot be read, is malformed, or does not match the others."""


class UsageError(NegmergeError):
    """Arguments that cannot work together (same file twice, output is an input, ...)."""


class ConfigError(NegmergeError):
    """A recipe or configuration is invalid; carries every problem found, not only the first."""

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = where + self.problems[0]
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{where}{len(self.problems)} problems:\n{lines}"
        super().__init__(message)


class NonFiniteError(NegmergeError):
    """NaN or Inf in an input or in a result."""


class OutputError(NegmergeError):
    """The output cannot be written (exists, folder missing, disk full, ...)."""


class RunsFailed(NegmergeError):
    """Runs of a sweep failed for good; the others finished (run the sweep again to retry)."""


class Interrupted(NegmergeError):
    """SIGINT or SIGTERM arrived; partial outputs have been removed."""
