"""Human output: names in tables, lines and progress bars cannot drive the terminal."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from jobs.cli import console

HOSTILE = "acme\x1b]0;owned\x07\x1b[2J\u202e [bold]x[/bold] :smile: [/nope]"


@pytest.fixture
def screen(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """stdout and stderr consoles writing to one buffer, as a colour terminal would."""
    buffer = io.StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=200)
    monkeypatch.setattr(console.out, "_console", terminal)
    monkeypatch.setattr(console.err, "_console", terminal)
    return buffer


def test_table_cells_are_plain_text(screen: io.StringIO) -> None:
    console.print_table(f"invoices {HOSTILE}", ["tenant", "host"],
                        [[HOSTILE, "日本のホスト é"], [None, 3]])
    shown = screen.getvalue()
    assert "\x1b]0;owned" not in shown and "\x1b[2J" not in shown and "\u202e" not in shown
    assert "\x07" not in shown
    assert shown.count("acme\\x1b]0;owned\\x07\\x1b[2J\\u202e [bold]x[/bold] :smile: [/nope]") == 2
    assert "日本のホスト é" in shown  # ordinary Unicode is kept


def test_lines_are_plain_text(screen: io.StringIO) -> None:
    console.print_line(f"free plan over its host limit: {HOSTILE}", stderr=True)
    shown = screen.getvalue()
    assert "\x1b]0;owned" not in shown and "[bold]x[/bold] :smile:" in shown


def test_progress_descriptions_are_plain_text(screen: io.StringIO,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with console.progress(f"ingest {HOSTILE}.jsonl", 10) as update:
        update(5, None)
    shown = screen.getvalue()
    assert "\x1b]0;owned" not in shown and "\x1b[2J" not in shown and "\u202e" not in shown
    assert "acme\\x1b]0;owned\\x07" in shown and "[bold]x[/bold]" in shown
