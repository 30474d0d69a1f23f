"""``hostmeter ingest``: record usage from JSON Lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import click

from jobs.cli.errors import EXIT_BAD_INPUT, fail
from jobs.cli.state import current_state

if TYPE_CHECKING:
    from metering.ingest import IngestSummary

__all__ = ["ingest"]


def _binary_lines(stream: BinaryIO, update: Any, size: int | None) -> Iterator[bytes]:
    done = 0
    for i, raw in enumerate(stream, start=1):
        done += len(raw)
        if size and i % 2000 == 0:
            update(done, size)
        yield raw
    if size:
        update(size, size)


@click.command()
@click.argument("source", metavar="FILE|-")
@click.option("--skip-invalid", is_flag=True,
              help="Load the good lines and report the bad ones (default: reject the whole file).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def ingest(source: str, skip_invalid: bool, fmt: str) -> None:
    """Record usage from JSON Lines (schema v1); FILE or - for stdin.

    \b
    Record types (one JSON object per line):
      {"type":"plan","tenant":"acme","plan":"standard","at":"2026-10-15T00:00:00+09:00"}
      {"type":"host_post","tenant":"acme","host":"h-1","kind":"standard",
       "at":"2026-10-15T10:03:00Z","metrics":["loadavg5","cpu.user"]}
      {"type":"service_post","tenant":"acme","service":"web","at":"…","metrics":["req.count"]}
      {"type":"monitor","tenant":"acme","monitor":"m-1","at":"…","state":"created|deleted"}
      {"type":"anomaly_role","tenant":"acme","role":"web:app","at":"…","enabled":true}
      {"type":"role_member","tenant":"acme","role":"web:app","host":"h-1","at":"…","member":true}

    Loading the same records again changes nothing. By default one bad line
    rejects the whole input and nothing is written.
    """
    from jobs.cli.console import progress
    from metering.errors import InvalidBatch
    from metering.ingest import ingest_lines

    if source == "-":
        stream: BinaryIO = sys.stdin.buffer
        size = None
    else:
        path = Path(source)
        if not path.is_file():  # bad input is reported before the database is touched
            fail(f"{source}: no such file", EXIT_BAD_INPUT)
        stream = path.open("rb")
        size = path.stat().st_size
    try:
        engine = current_state().engine()
        with progress(f"ingest {source}", size) as update:
            summary = ingest_lines(
                engine, _binary_lines(stream, update, size), skip_invalid=skip_invalid
            )
    except InvalidBatch as exc:
        # click.echo, not the rich console: a record's error stays on one line at any width.
        if exc.count > 1:
            for e in exc.errors[:5]:
                click.echo(f"  {e}", err=True)
            if exc.count > 5:
                click.echo(f"  … and {exc.count - 5} more", err=True)
        fail(f"{source}: {exc.errors[0]}; {exc}", EXIT_BAD_INPUT)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    _print_ingest(summary, fmt)


def _print_ingest(summary: IngestSummary, fmt: str) -> None:
    from jobs.cli.console import print_table

    data = summary.as_dict()
    if fmt == "json":
        data["errors"] = [
            {"line": e.line, "field": e.field, "message": e.message} for e in summary.errors
        ]
        click.echo(json.dumps(data))
        return
    print_table("ingest", ["records", "tenants", "hosts", "hours", "rows written", "rejected"],
                [[data["records"], data["tenants"], data["hosts"], data["hours"],
                  data["rows_written"], data["rejected"]]],
                right=["records", "tenants", "hosts", "hours", "rows written", "rejected"])
    if summary.rejected:
        click.echo(f"skipped {summary.rejected} invalid line(s); the first ones:", err=True)
        for e in summary.errors[:5]:
            click.echo(f"  {e}", err=True)
