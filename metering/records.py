"""Ingest records, schema version 1: parsing and validation of one JSON Lines record.

Each record is a JSON object with a ``type``; an optional ``"v": 1`` names the schema version.
Fields not listed here are ignored (forward compatible); a listed field that is missing or of
the wrong shape rejects the record with an :class:`~metering.errors.InvalidRecord` that names the
field and what was expected.

Whatever one line holds, :func:`parse_line` returns a record (or ``None`` for a blank line) or
raises that one error, never another exception: not for JSON nested a thousand deep
(``RecursionError``), a number of 5,000 digits (``ValueError``), an instant whose UTC form
leaves the calendar (``OverflowError``), bytes that are not UTF-8, or a line of a gigabyte (the
reader cuts it at :data:`MAX_LINE_BYTES`). A record that is accepted can be stored on every
backend: its names are UTF-8 without NUL, within :data:`BYTE_LIMITS`.

Why the limits are in bytes. PostgreSQL refuses a b-tree index entry over 2,704 bytes, and
the entry holds the whole key in UTF-8: a service name and a metric name of random four-byte
characters within the old *character* limits (255 + 500 characters) made a 3,056-byte entry in
``metric_names``' primary key and failed the whole load, which SQLite had accepted. Each limit
is the column's declared size, now counted in bytes: a value of n bytes has at most n
characters, so it fits its ``VARCHAR(n)`` on PostgreSQL; and the widest index entry that
ingest writes (the service-metric dictionary name, 255 + 500 bytes and a 5-byte prefix, with
the tenant id and namespace) stays under 800 bytes, a third of the b-tree limit. For ASCII
names, nearly all of them, bytes and characters are the same count.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

from metering.errors import InvalidRecord, InvalidWindow, shown
from metering.models import HOST_KINDS, PLANS
from metering.timeutil import parse_instant

__all__ = [
    "METRIC_LIST",
    "AnomalyRole",
    "HostPost",
    "HostPostWire",
    "MonitorChange",
    "PlanChange",
    "Record",
    "RoleMember",
    "ServicePost",
    "parse_line",
    "parse_record",
]

SCHEMA_VERSION = 1

BYTE_LIMITS: dict[str, int] = {
    "tenant": 200,  # tenants.key VARCHAR(200)
    "host": 255,  # hosts.key VARCHAR(255)
    "service": 255,  # within metric_names.name VARCHAR(800), with a metric name
    "monitor": 255,  # monitor_events.monitor VARCHAR(255)
    "role": 255,  # role_events.role, role_member_events.role, usage_snapshot_roles.role
    "metrics": 500,  # each metric name; metric_names.name VARCHAR(800)
}
"""The most UTF-8 bytes each text field may hold (see the module docstring for why)."""

MAX_LINE_BYTES = 1 << 20
"""The longest line (with its line break) that is parsed; a longer one is one rejected line,
read no further than this (a record is a few hundred bytes; a post of a thousand metric names
of 500 bytes each would still fit)."""

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)
"""Instants are accepted in ``[EARLIEST, LATEST)``: billing periods start in 1970
(:func:`~metering.timeutil.parse_period`), and every instant in range stays in years 1–9999
in any time zone, which PostgreSQL needs to read a ``timestamptz`` back in a session of any
zone, and the month after it still exists."""

_BOM = "\ufeff"


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanChange:
    """From ``at`` on, ``tenant`` is on ``plan``."""

    tenant: str
    plan: str
    at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class HostPost:
    """One metric post of an agent: the names of the metrics it carried."""

    tenant: str
    host: str
    kind: str
    at: datetime
    metrics: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePost:
    """One post of service metrics (not tied to a host)."""

    tenant: str
    service: str
    at: datetime
    metrics: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class MonitorChange:
    """A URL (external) monitor was created (``present``) or deleted at ``at``."""

    tenant: str
    monitor: str
    at: datetime
    present: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class AnomalyRole:
    """Anomaly detection was enabled or disabled for ``role`` at ``at``."""

    tenant: str
    role: str
    at: datetime
    enabled: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RoleMember:
    """``host`` joined (``member``) or left ``role`` at ``at``."""

    tenant: str
    role: str
    host: str
    at: datetime
    member: bool


Record = PlanChange | HostPost | ServicePost | MonitorChange | AnomalyRole | RoleMember
"""Any record that ingest accepts."""


class HostPostWire(msgspec.Struct, gc=False):
    """The shape of a ``host_post`` line, for the decoder of ingest's fast path
    (:mod:`metering.ingest`): msgspec checks the types in C while it decodes. It checks shapes
    only; the values (names within :data:`BYTE_LIMITS`, the instant) are checked by the same
    functions as :func:`parse_record`'s, once per distinct value. A line this does not decode
    goes through :func:`parse_line`, which accepts it or says exactly what is wrong.

    ``metrics`` stays raw JSON (its bytes, checked to be well-formed): agents post the same
    names minute after minute, so ingest looks the bytes up among the lists it has already
    decoded and checked, and decodes them with :data:`METRIC_LIST` only when they are new."""

    type: Literal["host_post"]
    tenant: str
    host: str
    kind: Literal["standard", "micro"]
    at: str
    metrics: msgspec.Raw
    v: int = SCHEMA_VERSION


METRIC_LIST = msgspec.json.Decoder(Annotated[list[str], msgspec.Meta(min_length=1)])
"""Decodes a :class:`HostPostWire`'s raw ``metrics``: a non-empty list of strings."""


def checked_text(field: str, value: str) -> bool:
    """Whether ``value`` passes :func:`parse_record`'s check of text field ``field``."""
    try:
        _str({field: value}, field)
    except InvalidRecord:
        return False
    return True


def checked_instant(value: str) -> datetime | None:
    """``value`` as :func:`parse_record` reads an ``at``, or ``None`` where it rejects it."""
    try:
        return _at({"at": value})
    except InvalidRecord:
        return None


def checked_metric(value: object) -> bool:
    """Whether ``value`` passes :func:`parse_record`'s check of one metric name."""
    return (isinstance(value, str) and bool(value.strip())
            and _text_problem(value, BYTE_LIMITS["metrics"]) is None)


def _text_problem(value: str, limit: int) -> str | None:
    """Why ``value`` cannot be stored as a name of at most ``limit`` UTF-8 bytes (a phrase that
    follows "which"), or ``None``.

    ASCII text, nearly every name, is checked without encoding it (its length is its size).
    """
    if "\x00" in value:
        return "holds a NUL (PostgreSQL cannot store it)"
    if value.isascii():
        size = len(value)
    else:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate, from a JSON escape such as "\ud800"
            return "holds an unpaired surrogate (not UTF-8 text)"
    if size > limit:
        return f"is {size} bytes long in UTF-8 (at most {limit} bytes)"
    return None


def _str(obj: dict[str, Any], field: str) -> str:
    value = obj.get(field)
    if value is None:
        raise InvalidRecord(f"missing field {field!r} (expected a non-empty string)", field=field)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRecord(
            f"field {field!r} must be a non-empty string, got {shown(value)}", field=field
        )
    problem = _text_problem(value, BYTE_LIMITS[field])
    if problem is not None:
        raise InvalidRecord(
            f"field {field!r} is {shown(value)}, which {problem} (expected UTF-8 text without "
            "NUL)",
            field=field,
        )
    return value


def _choice(obj: dict[str, Any], field: str, choices: tuple[str, ...]) -> str:
    value = obj.get(field)
    if not isinstance(value, str) or value not in choices:
        what = "missing" if value is None else shown(value)
        raise InvalidRecord(
            f"field {field!r} is {what} (expected one of {', '.join(choices)})", field=field
        )
    return value


def _bool(obj: dict[str, Any], field: str) -> bool:
    value = obj.get(field)
    if not isinstance(value, bool):
        what = "missing" if value is None else shown(value)
        raise InvalidRecord(f"field {field!r} is {what} (expected true or false)", field=field)
    return value


def _at(obj: dict[str, Any]) -> datetime:
    value = obj.get("at")
    if value is None:
        raise InvalidRecord(
            "missing field 'at' (expected an ISO 8601 instant with offset)", field="at"
        )
    try:
        at = parse_instant(value, what="field 'at'")
    except InvalidWindow as exc:
        raise InvalidRecord(exc.message, field="at") from None
    if not EARLIEST <= at < LATEST:
        raise InvalidRecord(
            f"field 'at' {shown(value)} is out of range (expected an instant from "
            "1970-01-01T00:00:00Z to before 9999-01-01T00:00:00Z)",
            field="at",
        )
    return at


def _metrics(obj: dict[str, Any]) -> tuple[str, ...]:
    value = obj.get("metrics")
    if not isinstance(value, list) or not value:
        what = "missing" if value is None else ("empty" if value == [] else shown(value))
        raise InvalidRecord(
            f"field 'metrics' is {what} (expected a non-empty list of metric names)",
            field="metrics",
        )
    limit = BYTE_LIMITS["metrics"]
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name.strip():
            problem: str | None = "is not a non-empty string"
        else:
            problem = _text_problem(name, limit)
            if problem is None:
                continue
        raise InvalidRecord(
            f"field 'metrics'[{i}] is {shown(name)}, which {problem} (expected a metric name of 1 "
            f"to {limit} bytes, UTF-8 text without NUL)",
            field="metrics",
        )
    return tuple(value)


def parse_record(obj: Any) -> Record:
    """Validate one decoded JSON value into a record, or raise :class:`InvalidRecord`."""
    if not isinstance(obj, dict):
        raise InvalidRecord(f"expected a JSON object, got {type(obj).__name__}", field=None)
    version = obj.get("v", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):  # JSON true == 1 in Python
        raise InvalidRecord(
            f"field 'v' is {shown(version)} (this hostmeter reads schema version 1)", field="v"
        )
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _PARSERS:  # a list or object is unhashable
        what = "missing" if kind is None else shown(kind)
        raise InvalidRecord(
            f"field 'type' is {what} (expected one of {', '.join(_PARSERS)})", field="type"
        )
    return _PARSERS[kind](obj)


def _plan(o: dict[str, Any]) -> Record:
    return PlanChange(tenant=_str(o, "tenant"), plan=_choice(o, "plan", PLANS), at=_at(o))


def _host_post(o: dict[str, Any]) -> Record:
    return HostPost(
        tenant=_str(o, "tenant"),
        host=_str(o, "host"),
        kind=_choice(o, "kind", HOST_KINDS),
        at=_at(o),
        metrics=_metrics(o),
    )


def _service_post(o: dict[str, Any]) -> Record:
    return ServicePost(
        tenant=_str(o, "tenant"),
        service=_str(o, "service"),
        at=_at(o),
        metrics=_metrics(o),
    )


def _monitor(o: dict[str, Any]) -> Record:
    state = _choice(o, "state", ("created", "deleted"))
    return MonitorChange(
        tenant=_str(o, "tenant"),
        monitor=_str(o, "monitor"),
        at=_at(o),
        present=state == "created",
    )


def _anomaly_role(o: dict[str, Any]) -> Record:
    return AnomalyRole(
        tenant=_str(o, "tenant"),
        role=_str(o, "role"),
        at=_at(o),
        enabled=_bool(o, "enabled"),
    )


def _role_member(o: dict[str, Any]) -> Record:
    return RoleMember(
        tenant=_str(o, "tenant"),
        role=_str(o, "role"),
        host=_str(o, "host"),
        at=_at(o),
        member=_bool(o, "member"),
    )


_PARSERS = {
    "plan": _plan,
    "host_post": _host_post,
    "service_post": _service_post,
    "monitor": _monitor,
    "anomaly_role": _anomaly_role,
    "role_member": _role_member,
}


def parse_line(text: str | bytes, *, line: int) -> Record | None:
    """Parse one line of JSON Lines; ``None`` for a blank line. Errors carry ``line``.

    Raises :class:`InvalidRecord` and nothing else, whatever ``text`` holds. A byte order mark
    is an error here: only the start of a file may carry one, and the reader of the file
    strips it (:func:`metering.ingest.ingest_lines`).
    """
    if len(text) > MAX_LINE_BYTES:
        raise InvalidRecord(
            f"line is longer than {MAX_LINE_BYTES} bytes (it starts {shown(text[:40])})",
            line=line,
        )
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRecord(
                f"not UTF-8 text (byte {exc.start}: {shown(text[exc.start : exc.start + 4])})",
                line=line,
            ) from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.pos == 0 and text.startswith(_BOM):
            message = "a byte order mark (U+FEFF) where only the start of the input may have one"
        else:
            message = f"not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"
        raise InvalidRecord(message, line=line) from None
    except RecursionError:
        raise InvalidRecord("not valid JSON here (nested too deeply)", line=line) from None
    except ValueError:  # an integer longer than int_max_str_digits
        raise InvalidRecord(
            f"not valid JSON here (a number of more than {sys.get_int_max_str_digits()} digits)",
            line=line,
        ) from None
    try:
        return parse_record(obj)
    except InvalidRecord as exc:
        raise InvalidRecord(exc.message, line=line, field=exc.field) from None
