"""Errors raised by the metering package.

Every package's root error derives from :class:`ContextError`, which carries keyword context.

The tree::

    MeteringError
    ├── ConfigError            a setting from the environment is unusable
    ├── DatabaseError          the database cannot be reached or answered with an error
    │   └── SchemaOutOfDate    the schema is behind the code; the message says what to run
    ├── InvalidRecord          one ingest record is malformed (carries ``line`` and ``field``)
    ├── InvalidBatch           an ingest batch was rejected as a whole (carries the bad records)
    └── InvalidWindow          a time window or instant is malformed (``--at``, ``--from``)

Each error carries its context as keyword arguments, so that a caller (the CLI, a log line) can
show it without parsing the message.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "ContextError",
    "DatabaseError",
    "InvalidBatch",
    "InvalidRecord",
    "InvalidWindow",
    "MeteringError",
    "SchemaOutOfDate",
]


class ContextError(Exception):
    """A one-line message plus its context as keyword arguments (``tenant=``, ``line=``)."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def __str__(self) -> str:
        return self.message


class MeteringError(ContextError):
    """Root of every error the metering package raises on purpose."""


class ConfigError(MeteringError):
    """A setting read from the environment cannot be used."""


class DatabaseError(MeteringError):
    """The database is unreachable or rejected a statement."""


class SchemaOutOfDate(DatabaseError):
    """The database schema is older than the code; run the command in the message."""


class InvalidRecord(MeteringError):
    """One ingest record is malformed."""

    def __init__(self, message: str, *, line: int | None = None, field: str | None = None) -> None:
        super().__init__(message, line=line, field=field)
        self.line = line
        self.field = field

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.message}"


class InvalidBatch(MeteringError):
    """An ingest batch was rejected whole because some of its records are malformed."""

    def __init__(self, message: str, *, errors: list[InvalidRecord], count: int) -> None:
        super().__init__(message, count=count)
        self.errors = errors
        self.count = count


class InvalidWindow(MeteringError):
    """A time window, instant or period is malformed."""
