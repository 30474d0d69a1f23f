"""Ingest records, schema version 1: parsing and validation of one JSON Lines record.

Each record is a JSON object with a ``type``; an optional ``"v": 1`` names the schema version.
Fields not listed here are ignored (forward compatible); a listed field that is missing or of
the wrong shape rejects the record with an :class:`~metering.errors.InvalidRecord` that names the
field and what was expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from metering.errors import InvalidRecord, InvalidWindow
from metering.models import HOST_KINDS, PLANS
from metering.timeutil import parse_instant

__all__ = [
    "AnomalyRole",
    "HostPost",
    "MonitorChange",
    "PlanChange",
    "Record",
    "RoleMember",
    "ServicePost",
    "parse_line",
    "parse_record",
]

SCHEMA_VERSION = 1
MAX_KEY = 200
MAX_NAME = 500


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


def _storable(text: str) -> bool:
    """Whether every backend can store ``text``: no NUL (PostgreSQL) and no lone surrogate."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _str(obj: dict[str, Any], field: str, *, limit: int = MAX_KEY) -> str:
    value = obj.get(field)
    if value is None:
        raise InvalidRecord(f"missing field {field!r} (expected a non-empty string)", field=field)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRecord(
            f"field {field!r} must be a non-empty string, got {value!r}", field=field
        )
    if len(value) > limit:
        raise InvalidRecord(
            f"field {field!r} is {len(value)} characters long (at most {limit})", field=field
        )
    if not _storable(value):
        raise InvalidRecord(
            f"field {field!r} is {value!r}, which holds a NUL or an unpaired surrogate "
            "(expected UTF-8 text without NUL)",
            field=field,
        )
    return value


def _choice(obj: dict[str, Any], field: str, choices: tuple[str, ...]) -> str:
    value = obj.get(field)
    if value not in choices:
        shown = "missing" if value is None else repr(value)
        raise InvalidRecord(
            f"field {field!r} is {shown} (expected one of {', '.join(choices)})", field=field
        )
    assert isinstance(value, str)
    return value


def _bool(obj: dict[str, Any], field: str) -> bool:
    value = obj.get(field)
    if not isinstance(value, bool):
        shown = "missing" if value is None else repr(value)
        raise InvalidRecord(f"field {field!r} is {shown} (expected true or false)", field=field)
    return value


def _at(obj: dict[str, Any]) -> datetime:
    value = obj.get("at")
    if value is None:
        raise InvalidRecord(
            "missing field 'at' (expected an ISO 8601 instant with offset)", field="at"
        )
    try:
        return parse_instant(value, what="field 'at'")
    except InvalidWindow as exc:
        raise InvalidRecord(exc.message, field="at") from exc


def _metrics(obj: dict[str, Any]) -> tuple[str, ...]:
    value = obj.get("metrics")
    if not isinstance(value, list) or not value:
        shown = "missing" if value is None else ("empty" if value == [] else repr(value)[:60])
        raise InvalidRecord(
            f"field 'metrics' is {shown} (expected a non-empty list of metric names)",
            field="metrics",
        )
    for i, name in enumerate(value):
        if (not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME
                or not _storable(name)):
            raise InvalidRecord(
                f"field 'metrics'[{i}] is {name!r} (expected a metric name of 1 to "
                f"{MAX_NAME} characters, UTF-8 text without NUL)",
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
            f"field 'v' is {version!r} (this hostmeter reads schema version 1)", field="v"
        )
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _PARSERS:  # a list or object is unhashable
        shown = "missing" if kind is None else repr(kind)
        raise InvalidRecord(
            f"field 'type' is {shown} (expected one of {', '.join(_PARSERS)})", field="type"
        )
    return _PARSERS[kind](obj)


def _plan(o: dict[str, Any]) -> Record:
    return PlanChange(tenant=_str(o, "tenant"), plan=_choice(o, "plan", PLANS), at=_at(o))


def _host_post(o: dict[str, Any]) -> Record:
    return HostPost(
        tenant=_str(o, "tenant"),
        host=_str(o, "host", limit=255),
        kind=_choice(o, "kind", HOST_KINDS),
        at=_at(o),
        metrics=_metrics(o),
    )


def _service_post(o: dict[str, Any]) -> Record:
    return ServicePost(
        tenant=_str(o, "tenant"),
        service=_str(o, "service", limit=255),
        at=_at(o),
        metrics=_metrics(o),
    )


def _monitor(o: dict[str, Any]) -> Record:
    state = _choice(o, "state", ("created", "deleted"))
    return MonitorChange(
        tenant=_str(o, "tenant"),
        monitor=_str(o, "monitor", limit=255),
        at=_at(o),
        present=state == "created",
    )


def _anomaly_role(o: dict[str, Any]) -> Record:
    return AnomalyRole(
        tenant=_str(o, "tenant"),
        role=_str(o, "role", limit=255),
        at=_at(o),
        enabled=_bool(o, "enabled"),
    )


def _role_member(o: dict[str, Any]) -> Record:
    return RoleMember(
        tenant=_str(o, "tenant"),
        role=_str(o, "role", limit=255),
        host=_str(o, "host", limit=255),
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
    """Parse one line of JSON Lines; ``None`` for a blank line. Errors carry ``line``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRecord(f"not UTF-8 text (byte {exc.start})", line=line) from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRecord(f"not valid JSON ({exc.msg} at column {exc.colno})", line=line) from exc
    try:
        return parse_record(obj)
    except InvalidRecord as exc:
        raise InvalidRecord(exc.message, line=line, field=exc.field) from None
