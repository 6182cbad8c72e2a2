"""The project's own error type.

Every problem caused by the user's input (a file, an option, a model) is raised as a
:class:`DripError`. The CLI turns it into one line on stderr and exit status 1; library users
catch it like any exception.
"""

from __future__ import annotations

import math
import os
import signal


class DripError(Exception):
    """A bad input: names the offending file (or option) and what is wrong with it."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.message = message
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class OutputError(DripError):
    """An output the disk refused (full, over quota, over the file-size limit); the file named
    was not written, and an earlier version of it, if any, is kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch system's time limit) is handled as Ctrl-C is: the output in
    progress is removed, a training run keeps its last checkpoint."""


# The interrupting signals received during the command (the CLI's handlers record them).
SIGNALS_RECEIVED: list[int] = []


def raise_if_signalled() -> None:
    """Raise again the interruption of a signal whose exception was lost. Python prints an
    exception raised in a destructor or a weak-reference callback as "Exception ignored" and
    goes on: a SIGTERM that arrived there let ``drip simulate`` finish its file and exit 0.
    The writers call this before an output appears, and the progress display at every update."""
    if SIGNALS_RECEIVED:
        raise Terminated if SIGNALS_RECEIVED[-1] == signal.SIGTERM else KeyboardInterrupt


class DripWarning(UserWarning):
    """A doubt about the input that does not stop the work (a ground truth outside [0, 1]):
    the CLI prints it as one ``drip: warning:`` line."""


def with_article(word: str) -> str:
    """``word`` after its indefinite article, for messages: "a drip", "an unrolled"."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def require_regular_file(path: str | os.PathLike, expected: str) -> None:
    """Refuse an input that exists but is neither a file nor a folder (a device, a pipe) before
    anything opens it: opening a pipe that no process writes blocks for good, beyond the
    reach of Ctrl-C."""
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise DripError(f"is not a regular file (a device or a pipe), expected {expected}", path)


# seeds are stored in files (an HDF5 attribute, a run's config) and seed torch's generators,
# which take signed 64-bit integers: a larger --seed was an "unexpected ValueError"
SEED_MAX = 2**63 - 1


def require_positive(option: str, value: float) -> None:
    """Refuse a numeric option unless it is positive and finite (so NaN and inf too)."""
    if not (math.isfinite(value) and value > 0):
        raise DripError(f"{option} must be a positive number, got {value:g}")


def is_finite_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def setting_type_problem(name: str, value, default) -> str | None:
    """Why ``value``, read from a file (a model header, a run's ``config.json``), cannot be the
    setting ``name`` whose default is ``default``: it must have the default's type (a list of
    numbers, or null, for a tuple). ``None`` when it can."""
    if default is None:
        return None
    if isinstance(default, str):
        fits, kind = isinstance(value, str), "a string"
    elif isinstance(default, bool):
        fits, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        fits, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        fits, kind = is_finite_number(value), "a finite number"
    elif isinstance(default, tuple):
        fits = value is None or (isinstance(value, list) and all(map(is_finite_number, value)))
        kind = "a list of numbers"
    else:
        return None
    return None if fits else f"setting {name} = {value!r} is not {kind}"
