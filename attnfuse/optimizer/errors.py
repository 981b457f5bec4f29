"""The two failures a user can act on; the command line maps each to an exit code."""
from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input: a missing or unreadable model, an unwritable output, a bad option.

    The message is one line and names the file or option at fault (exit code 1).
    """


class VerificationError(Exception):
    """The optimized model does not reproduce the original within tolerance (exit code 2).

    `report` is the run's Report, with the failed check in `report.verify`.
    """

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report


def first_line(error: BaseException) -> str:
    """The first line of an exception's message: what fits in a one-line report."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
