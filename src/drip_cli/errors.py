"""The project's own error type.

Every problem caused by the user's input (a file, an option, a model) is raised as a
:class:`DripError`. The CLI turns it into one line on stderr and exit status 1; library users
catch it like any exception.
"""

from __future__ import annotations

import math
import os


class DripError(Exception):
    """A bad input: names the offending file (or option) and what is wrong with it."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.message = message
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


def require_positive(option: str, value: float) -> None:
    """Refuse a numeric option unless it is positive and finite (so NaN and inf too)."""
    if not (math.isfinite(value) and value > 0):
        raise DripError(f"{option} must be a positive number, got {value:g}")
