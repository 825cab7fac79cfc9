"""Every error levers reports to a user: what went wrong, where, and what to do about it.

This module imports nothing of levers, so every other module can raise from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Exit codes of the CLI: 1 for a failure at run time, 2 for bad input (the shell's usage code).
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class LeversError(Exception):
    """Base of all errors levers reports. ``fix`` tells the user what to do."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} ({self.fix})" if self.fix else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # whole across a process boundary: Exception's own pickling keeps only the message
        return _rebuilt, (type(self), self.__dict__)


def _rebuilt(kind: type[LeversError], state: dict[str, Any]) -> LeversError:
    error = kind.__new__(kind)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


class ServerError(LeversError):
    """The embedded server could not be started or stopped."""


class ConnectionFailed(LeversError):
    """The Redis server named by the configuration does not answer."""


class StoreError(LeversError):
    """The artifact store cannot be reached, has no such bucket, or refuses the credentials."""


class SupervisorFailed(LeversError):
    """The supervisor cannot go on; it stopped its workers, for the platform to restart it."""


class UsageError(LeversError):
    """A command was given arguments it cannot act on."""

    exit_code = EXIT_BAD_INPUT


@dataclass(frozen=True)
class SpecProblem:
    """One problem in a pipeline file, located at a line and column (both 1-based)."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class SpecError(LeversError):
    """pipeline.yaml is invalid; carries every problem found, not just the first."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: list[SpecProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


class DocumentError(LeversError):
    """A document cannot be submitted (missing path, unsupported type, too large)."""

    exit_code = EXIT_BAD_INPUT
