"""``hostmeter ingest``: record usage from JSON Lines.

Every bad line is reported, in bounded memory however many there are: the count always; on
stderr the first :data:`SHOWN_ERRORS` and "… and N more"; with ``--format json`` all of them,
in the ``errors`` array of the one JSON object printed, also when the input is rejected (exit
2). For JSON they are written to a temporary file as they are found and copied out at the end
(:class:`_RejectedLines`), so a file of millions of bad lines costs disk, not memory.

An input that is recorded (committed) logs one ``tenant_ingested`` (info) per tenant it names,
in the order it first names them: ``tenant`` (its key), ``posts`` (its ``host_post`` and
``service_post`` lines) and ``records`` (all its records); ``--skip-invalid`` counts the lines
recorded, not the skipped ones. Only the first
:data:`~metering.ingest.ITEMISED_TENANTS` tenants are itemised: past them one
``tenants_not_itemised`` event gives how many more tenants there were (``tenants``) and their
``posts`` and ``records`` together. A rejected input logs none. These lines carry
``job=ingest``, a ``run_id`` of their own and, for ``logical_time``, the instant the command
started (an input has no scheduled time).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

import click

from jobs.cli.errors import EXIT_BAD_INPUT, fail
from jobs.cli.state import current_state
from metering.display import quote_name

if TYPE_CHECKING:
    from metering.errors import InvalidRecord
    from metering.ingest import IngestSummary

__all__ = ["ingest"]

SHOWN_ERRORS = 20
"""Bad lines listed on stderr for a person; the rest are counted ("… and N more")."""


class _RejectedLines:
    """Every bad line as a JSON object, spilled to a temporary file as it is found."""

    def __init__(self) -> None:
        self.file: TextIO = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115

    def __call__(self, error: InvalidRecord) -> None:
        self.file.write(_error_json(error) + "\n")

    def write_array(self, out: TextIO) -> None:
        """Write ``[…]`` with every bad line, in input order, streaming from the file."""
        self.file.seek(0)
        out.write("[")
        for i, line in enumerate(self.file):
            out.write(line.rstrip("\n") if i == 0 else ", " + line.rstrip("\n"))
        out.write("]")

    def close(self) -> None:
        self.file.close()


def _error_json(error: InvalidRecord) -> str:
    return json.dumps({"line": error.line, "field": error.field, "message": error.message})


def _print_json(data: dict[str, Any], rejected: _RejectedLines | None) -> None:
    """One JSON object: ``data`` and ``"errors"``, every bad line, streamed in."""
    out = sys.stdout
    out.write(json.dumps(data)[:-1] + ', "errors": ')
    if rejected is None:
        out.write("[]")
    else:
        rejected.write_array(out)
    out.write("}\n")
    out.flush()


def _list_errors(errors: Iterable[InvalidRecord], count: int) -> None:
    shown = 0
    for e in errors:
        if shown == SHOWN_ERRORS:
            break
        click.echo(f"  {e}", err=True)
        shown += 1
    if count > shown:
        click.echo(f"  … and {count - shown} more", err=True)


def _binary_lines(stream: BinaryIO, update: Any, size: int | None) -> Iterator[bytes]:
    from metering.ingest import read_lines

    done = 0
    for i, raw in enumerate(read_lines(stream), start=1):
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
    rejects the whole input and nothing is written (exit 2); every bad line is
    counted, the first 20 are listed, and --format json lists all of them.
    """
    from jobs.cli.console import progress
    from metering.errors import InvalidBatch
    from metering.ingest import ingest_lines

    path: Path | None = None
    if source == "-":
        stream: BinaryIO = sys.stdin.buffer
        size = None
    else:
        path = Path(source)
        if not path.is_file():  # bad input is reported before the database is touched
            fail(f"{quote_name(source, limit=300)}: no such file", EXIT_BAD_INPUT)
        stream = path.open("rb")
        size = path.stat().st_size
    opened = [stream]
    rejected = _RejectedLines() if fmt == "json" else None
    started = datetime.now(UTC)
    try:
        engine = current_state().engine()
        with progress(f"ingest {source}", size) as update:

            def reopen() -> Iterator[bytes]:
                # A run aborted by a deadlock with a concurrent ingest reads the file again.
                assert path is not None
                opened.append(path.open("rb"))
                return _binary_lines(opened[-1], update, size)

            summary = ingest_lines(
                engine, _binary_lines(stream, update, size), skip_invalid=skip_invalid,
                on_error=rejected, reopen=reopen if path is not None else None,
            )
        _log_tenants(summary, started)
        _print_ingest(summary, fmt, rejected)
    except InvalidBatch as exc:
        if rejected is not None:
            _print_json({"records": exc.records, "rows_written": 0, "rejected": exc.count},
                        rejected)
        elif exc.count > 1:
            # click.echo, not the rich console: a record's error stays on one line at any width.
            _list_errors(exc.errors, exc.count)
        fail(f"{quote_name(source, limit=300)}: {exc.errors[0]}; {exc}", EXIT_BAD_INPUT)
    finally:
        for f in opened:
            if f is not sys.stdin.buffer:
                f.close()
        if rejected is not None:
            rejected.close()


def _log_tenants(summary: IngestSummary, started: datetime) -> None:
    """The per-tenant events of a recorded input (see the module docstring)."""
    import structlog

    from jobs.runtime.context import new_run_id
    from jobs.runtime.logconfig import item_events

    with structlog.contextvars.bound_contextvars(job="ingest", run_id=new_run_id(),
                                                 logical_time=started.isoformat()):
        with item_events("tenant_ingested") as emit:
            for tenant, (posts, records) in summary.per_tenant.items():
                emit(tenant=tenant, posts=posts, records=records)
        if summary.tenants_not_itemised:
            posts, records = summary.not_itemised
            structlog.get_logger().info("tenants_not_itemised",
                                        tenants=summary.tenants_not_itemised,
                                        posts=posts, records=records)


def _print_ingest(summary: IngestSummary, fmt: str, rejected: _RejectedLines | None) -> None:
    from jobs.cli.console import print_table

    data = summary.as_dict()
    if fmt == "json":
        _print_json(data, rejected)
        return
    print_table("ingest", ["records", "tenants", "hosts", "hours", "rows written", "rejected"],
                [[data["records"], data["tenants"], data["hosts"], data["hours"],
                  data["rows_written"], data["rejected"]]],
                right=["records", "tenants", "hosts", "hours", "rows written", "rejected"])
    if summary.rejected:
        click.echo(f"skipped {summary.rejected} invalid line(s):", err=True)
        _list_errors(summary.errors, summary.rejected)
