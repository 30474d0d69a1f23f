"""Human output: rich tables and progress bars (bars only when stderr is a terminal)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

__all__ = ["out", "print_table", "progress"]

# Off a terminal (a pipe, a CI log) rich would wrap tables at 80 columns; give them room.
out = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False)


def print_table(
    title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]],
    *, right: Sequence[str] = (),
) -> None:
    table = Table(title=title, title_justify="left", show_lines=False)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
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
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    with bar:
        task = bar.add_task(description, total=total)

        def update(done: int, new_total: int | None = None) -> None:
            if new_total is not None:
                bar.update(task, completed=done, total=new_total)
            else:
                bar.update(task, completed=done)

        yield update
