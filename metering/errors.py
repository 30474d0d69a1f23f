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
show it without parsing the message. A message is one line, and a value it quotes is cut short
(:func:`shown`): a record may hold a megabyte string or a list nested a thousand deep.
"""

from __future__ import annotations

import reprlib
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
    "shown",
]

_SHOWN = reprlib.Repr()
_SHOWN.maxlevel = 2
_SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxtuple = 4
_SHOWN.maxstring = _SHOWN.maxother = 40
_SHOWN.maxlong = 40


def shown(value: object, *, limit: int = 40) -> str:
    """``value`` as it appears in a one-line error message: its ``repr`` (which escapes line
    breaks and other unprintable characters), cut to about ``limit`` characters.

    A long string is cut with its length said (``'aaaa…' (10000 characters)``); containers are
    cut in length and depth, so that showing any decoded JSON value costs little.
    """
    if isinstance(value, str):
        n = min(len(value), limit)
        while len(text := repr(value[:n])) > limit + 2:  # escapes (\U0010ffff) count too
            n -= 1
        return text if n == len(value) else f"{text}… ({len(value)} characters)"
    try:
        return _SHOWN.repr(value)
    except (ValueError, RecursionError):  # an int too long to print, a pathological object
        return f"<{type(value).__name__}>"


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

    def __init__(
        self, message: str, *, errors: list[InvalidRecord], count: int, records: int = 0
    ) -> None:
        super().__init__(message, count=count, records=records)
        self.errors = errors
        """The first bad records (a bounded list); ``count`` says how many there were."""
        self.count = count
        self.records = records
        """How many valid records the rejected input held."""


class InvalidWindow(MeteringError):
    """A time window, instant or period is malformed."""


class HotPathUnavailable(MeteringError):
    """Redis (the post-time hot path) did not answer within the timeout, or refused the
    connection: what was asked of it was not done there."""


class HotPathRejected(MeteringError):
    """A post the hot path does not record: a tenant, host or metric name ingest would refuse
    (or a tenant with a brace, which the Redis keys cannot carry)."""
