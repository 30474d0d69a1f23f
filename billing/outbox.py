"""The webhook outbox: events written in the transaction of the change that causes them.

A change that a tenant should hear about (an invoice drafted, revised or finalized; a budget
threshold crossed or cleared) calls :func:`enqueue` on the connection that makes the change.
The events and their deliveries — one per enabled endpoint of the tenant, plus every global
endpoint — then commit or roll back with the change itself: a dry run or a failed tenant sends
nothing, and nothing committed is ever lost. ``deliver-webhooks`` sends them later.

Events:

- ``id`` (the table's integer) orders a tenant's events; deliveries to one endpoint follow it.
- ``event_id`` is the public id, ``evt_`` and 32 hex digits derived from the event's identity
  (``key``): the same fact written twice is the same event, and the unique index refuses the
  second. It is sent as ``Idempotency-Key`` and ``Hostmeter-Event-Id``.
- ``payload`` is the whole JSON body, fixed when the event is written, so every retry sends
  the same bytes.

Signature (:func:`sign`, checked by :func:`verify`): ``Hostmeter-Signature: t=<unix
seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the endpoint's secret>``, the Stripe
scheme. A receiver recomputes the HMAC over the timestamp and the raw body, compares in constant
time, and refuses a timestamp older than its tolerance (five minutes is usual) against replays.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from billing import notices as n
from metering.db import bulk_insert

__all__ = [
    "SIGNATURE_HEADER",
    "Event",
    "body_bytes",
    "enqueue",
    "event_id",
    "sign",
    "verify",
]

SIGNATURE_HEADER = "Hostmeter-Signature"
_IDS_PER_STATEMENT = 5000


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One event to write. ``key`` names the fact (``invoice.drafted:acme:2026-11:1``); the
    public id is derived from it."""

    type: str
    tenant: str
    tenant_id: int
    key: str
    data: dict[str, Any]

    def __post_init__(self) -> None:
        if self.type not in n.EVENT_TYPES:
            raise ValueError(f"unknown event type {self.type!r}")


def event_id(key: str) -> str:
    """The public id of the event named ``key``: ``evt_`` + 32 hex digits."""
    return "evt_" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _payload(event: Event, created_at: datetime) -> dict[str, Any]:
    return {
        "id": event_id(event.key),
        "type": event.type,
        "created": created_at.isoformat(),
        "tenant": event.tenant,
        "data": event.data,
    }


def body_bytes(payload: dict[str, Any]) -> bytes:
    """The exact bytes POSTed for a stored payload (compact, keys sorted, UTF-8): the same
    bytes on every attempt."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def enqueue(conn: Connection, events: Sequence[Event], *, now: datetime,
            run_id: str | None = None) -> int:
    """Write ``events`` and fan each out to the endpoints that should receive it, in the
    caller's transaction. Returns the number of deliveries queued. An event already written
    (same key) raises: a fact is announced once."""
    if not events:
        return 0
    ev, ep, dl = n.outbox_events, n.webhook_endpoints, n.webhook_deliveries
    bulk_insert(conn, ev, [
        {"event_id": event_id(e.key), "type": e.type, "tenant_id": e.tenant_id,
         "payload": _payload(e, now), "created_at": now, "run_id": run_id}
        for e in events
    ])
    ids = [event_id(e.key) for e in events]
    queued = 0
    for i in range(0, len(ids), _IDS_PER_STATEMENT):
        chunk = ids[i : i + _IDS_PER_STATEMENT]
        fan_out = (
            sa.select(ev.c.id, ep.c.id, ev.c.tenant_id, sa.literal("pending"), sa.literal(0),
                      sa.literal(now, n.webhook_deliveries.c.next_attempt_at.type),
                      sa.literal(now, n.webhook_deliveries.c.created_at.type))
            .join(ep, sa.and_(ep.c.enabled.is_(True),
                              sa.or_(ep.c.tenant_id.is_(None), ep.c.tenant_id == ev.c.tenant_id)))
            .where(ev.c.event_id.in_(chunk))
        )
        queued += conn.execute(
            sa.insert(dl).from_select(
                ["event_pk", "endpoint_id", "tenant_id", "status", "attempts",
                 "next_attempt_at", "created_at"], fan_out)
            # an INSERT's rowcount is kept only on request (else -1 on PostgreSQL)
            .execution_options(preserve_rowcount=True)
        ).rowcount
    return queued


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Hostmeter-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, *, now: int, tolerance: int = 300) -> bool:
    """What a receiver does: the header's ``v1`` matches the HMAC of ``t`` and the raw body,
    and ``t`` is within ``tolerance`` seconds of ``now``."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))
