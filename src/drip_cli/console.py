"""Console output: result tables on stdout, progress and errors on stderr."""

from __future__ import annotations

import contextlib
import math
import shutil
import sys

from rich import box
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from .errors import raise_if_signalled

# Outside a terminal rich assumes 80 columns, which truncates the result tables; use the terminal's
# width when there is one and 120 otherwise ($COLUMNS still wins).
_WIDTH = shutil.get_terminal_size((120, 24)).columns
console = Console(width=_WIDTH if not sys.stdout.isatty() else None)
err_console = Console(stderr=True)


def _draws(quiet: bool) -> bool:
    """Whether progress is drawn: not with ``--quiet``, and on a terminal only (into a file or a
    pipe rich cannot erase it, and it left a blank line above an error message)."""
    return not quiet and err_console.is_terminal


@contextlib.contextmanager
def progress_bar(description: str, total: float, quiet: bool, percent: bool = False):
    """Yield ``update(done, total=None, description=None)``; a rich progress bar on stderr
    unless ``quiet``, counting ``done`` of ``total`` (or, with ``percent``, showing their ratio
    as a percentage: a share of a budget, as ``drip train``'s steps or minutes, whichever ends
    it first). ``done=None`` keeps the count (a new description only).

    The bar is transient: it disappears when the work ends, so an error message stays the only
    line on stderr and result tables follow a clean screen. It is drawn on a terminal only
    (:func:`_draws`).
    Each update also raises a Ctrl-C or SIGTERM whose exception was lost on the way
    (:func:`~drip_cli.errors.raise_if_signalled`), so that the work stops there.
    """
    if not _draws(quiet):
        yield lambda done, total=None, description=None: raise_if_signalled()
        return
    count = TaskProgressColumn() if percent else MofNCompleteColumn()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), count,
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                  transient=True) as progress:
        task = progress.add_task(description, total=total)

        def update(done: float | None, total_now: float | None = None,
                   description: str | None = None) -> None:
            raise_if_signalled()
            progress.update(task, completed=done, total=total_now or total,
                            description=description)

        yield update


@contextlib.contextmanager
def status(message: str, quiet: bool):
    """Yield ``say(message)``; a transient spinner on stderr with the message, for work that
    has no count to show (building a large operator, measuring its norm), unless ``quiet``.
    Drawn on a terminal only, as :func:`progress_bar` is; ``say`` also raises a lost Ctrl-C or
    SIGTERM."""
    if not _draws(quiet):
        yield lambda message: raise_if_signalled()
        return
    with err_console.status(message) as spinner:

        def say(message: str) -> None:
            raise_if_signalled()
            spinner.update(message)

        yield say


def fmt(value, spec: str = ".4g") -> str:
    """A table cell: floats formatted by ``spec`` (four significant figures unless told), None
    and NaN as a dash (R for methods without one, SSIM of images smaller than its window)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


class _FittingTable(Table):
    """A table that, where rich would have to cut its cells to fit the console (its least
    width, every cell's longest word whole, is wider), first drops its vertical rules, its
    outer padding and one space between columns (rich's ``SIMPLE_HEAD`` box, padding
    collapsed), and only then lets rich narrow its columns: on an 80-column terminal rich cut
    the result table of ``drip reconstruct`` to ``meth…``, ``samp…``, an SSIM of ``0.82…`` and
    ``s/im…``: its ten columns need at least 72 characters so, and 85 with the rules.
    A table with a folding column (:func:`key_value_table`'s values) cuts nothing: it wraps a
    long value (a path, a sha256) onto the next line, and keeps its box."""

    def __rich_console__(self, console, options):
        folds = any(column.overflow == "fold" for column in self.columns)   # cuts nothing
        if self.box is not None and self.show_edge and not folds and \
                self.__rich_measure__(console, options).minimum > options.max_width:
            self.box, self.show_edge, self.pad_edge = box.SIMPLE_HEAD, False, False
            self.collapse_padding = True
        yield from super().__rich_console__(console, options)


def titled_table(title: str, caption: str | None = None, **settings) -> Table:
    """A table with its title (and caption) on the left, at least as wide as they are up to
    the console's width: rich wraps them to the table's own width, and a narrow table (one
    method) broke "robustness: test.h5, blur, tau 1" over two lines and its caption over
    three."""
    width = min(max(len(text) for text in (title, caption or "")), console.width)
    return _FittingTable(title=title, title_justify="left", caption=caption,
                         caption_justify="left", min_width=width, **settings)


def key_value_table(title: str, rows: dict) -> Table:
    table = titled_table(title, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")   # a hash or a path too long for the line goes on the next
    for key, value in rows.items():
        table.add_row(str(key), fmt(value) if not isinstance(value, str) else value)
    return table


def error_line(message: str) -> None:
    """One line on stderr, never wrapped (scripts grep it)."""
    sys.stderr.write("drip: error: " + " ".join(str(message).split()) + "\n")


def warning_line(message: str) -> None:
    """One warning line on stderr."""
    sys.stderr.write("drip: warning: " + " ".join(str(message).split()) + "\n")
