"""Human output: rich tables and progress bars (bars only when stderr is a terminal).

rich is imported on first use, not with this module: ``hostmeter --help`` and JSON output
never pay for it.

Everything shown here may hold names users chose (tenants, hosts, metrics, files), so every
cell, title, line and progress description is plain text: control characters are escaped
visibly (:func:`metering.display.escape_controls`: ``ESC`` shows as ``\x1b``), and rich's
markup (``[bold]``, ``[link=…]``) and emoji codes (``:smile:``) are not interpreted.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from metering.display import escape_controls

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

__all__ = ["err", "out", "plain", "print_line", "print_table", "progress"]


class _LazyConsole:
    """A :class:`rich.console.Console` made (and rich imported) on first attribute access."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def get(self) -> Console:
        """The console itself, made on the first call."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


# Off a terminal (a pipe, a CI log) rich would wrap tables at 80 columns; give them room.
out = _LazyConsole(highlight=False, soft_wrap=False,
                   width=None if sys.stdout.isatty() else 200)
err = _LazyConsole(stderr=True, highlight=False)


def plain(value: Any) -> Text:
    """``value`` as rich text shown as it is: no markup, no emoji codes, controls escaped."""
    from rich.text import Text

    return Text("" if value is None else escape_controls(str(value)))


def print_line(text: str, *, stderr: bool = False) -> None:
    """One line of plain text on stdout (or stderr)."""
    (err if stderr else out).print(plain(text))


def print_table(
    title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]],
    *, right: Sequence[str] = (),
) -> None:
    from rich.table import Table

    table = Table(title=None if title is None else plain(title), title_justify="left",
                  show_lines=False)
    for col in columns:
        table.add_column(plain(col), justify="right" if col in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(plain(v) for v in row))
    out.print(table)


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[int, int | None], None]]:
    """A progress bar on stderr when it is a terminal; otherwise a no-op callback.

    The callback takes ``(completed, total)``.
    """
    if not sys.stderr.isatty():

        def ignore(done: int, new_total: int | None = None) -> None:
            return None

        yield ignore
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err.get(),
        transient=False,
    )
    from rich.markup import escape

    with bar:
        task = bar.add_task(escape(escape_controls(description)), total=total)

        def update(done: int, new_total: int | None = None) -> None:
            if new_total is not None:
                bar.update(task, completed=done, total=new_total)
            else:
                bar.update(task, completed=done)

        yield update
