"""Webhook endpoints and the delivery queue: what ``hostmeter webhooks`` and ``deliver-webhooks``
read and write.

Endpoints (:func:`add_endpoint`, :func:`remove_endpoint`): one tenant's, or global (every
tenant's events). A URL is ``https://``, or ``http://`` to a loopback host only; it carries no
``user:password@`` (it is shown by ``webhooks endpoints``; the signature is what authenticates
hostmeter) and no ``#fragment``. The secret is one line of text, stored once and never read
back by anything but the deliverer: :class:`Endpoint` has no secret field, and
:class:`Delivery` keeps it out of its ``repr``. Removing an endpoint disables it (its history
stays) and marks its pending deliveries ``dead`` with ``last_error`` "endpoint removed", so
they show in ``webhooks list --failed``; they cannot be redelivered to a disabled endpoint.

The queue (:func:`due_heads`, :func:`next_of_pair`): deliveries to one endpoint of one
tenant's events leave **in event order**. Only the oldest ``pending`` delivery (lowest
``event_pk``) of each (endpoint, tenant) pair may be sent, and only when its
``next_attempt_at`` has come; ``delivered`` and ``dead`` ones no longer hold the pair back.

The retry policy (pure, :func:`outcome_of` and :func:`retry_at`):

- 2xx → ``delivered``.
- a timeout, a connection error, 408, 429 and 5xx → retried: the next attempt after
  ``60 s × 2^(attempts−1)``, at most one hour; a ``Retry-After`` (seconds or an HTTP date) on
  429/503 replaces that delay, within the same one-hour cap. Retries go on until the delivery's
  retry window (``HOSTMETER_WEBHOOK_RETRY_HOURS`` since it was queued) closes: the last attempt
  is at the window's end, and a failure then makes it ``dead``.
- anything else (3xx: redirects are not followed; 4xx but 408 and 429) → ``dead`` at once, the
  status recorded: the receiver refused this request and sending the same bytes again will not
  change its mind. ``webhooks redeliver`` sends it again once the receiver is fixed.

State changes (:func:`record_attempt`) are conditional on the row being as it was read (still
``pending``, same ``attempts``), so an operator's ``redeliver`` or ``remove`` racing a run wins
cleanly; each is committed by the caller right after its attempt.

:func:`redeliver` puts a ``dead`` or ``delivered`` delivery back to ``pending``, due now, with a
fresh retry window (``created_at`` becomes the time it was queued again, ``attempts`` 0); the
event, its id and its body are the same. A ``pending`` one is made due now.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from billing import notices as n
from billing.errors import WebhookRefused
from billing.repository import resolve_tenants
from metering.display import quote_name
from metering.models import tenants

__all__ = [
    "BASE_DELAY",
    "MAX_DELAY",
    "Delivery",
    "DeliveryRow",
    "Endpoint",
    "Outcome",
    "QueueStats",
    "Requeued",
    "add_endpoint",
    "check_secret",
    "check_url",
    "due_heads",
    "list_deliveries",
    "list_endpoints",
    "next_of_pair",
    "outcome_of",
    "parse_retry_after",
    "queue_stats",
    "record_attempt",
    "redeliver",
    "remove_endpoint",
    "retry_at",
]

BASE_DELAY = timedelta(seconds=60)
"""The delay after a delivery's first failed attempt; it doubles with every further one."""
MAX_DELAY = timedelta(hours=1)
"""The longest wait between two attempts, also for a ``Retry-After``."""
MIN_DELAY = timedelta(seconds=1)
"""The shortest (a ``Retry-After: 0`` still waits for a later run)."""
URL_LIMIT = 2048
SECRET_LIMIT = 1024

Outcome = Literal["delivered", "retry", "dead"]
"""What an attempt's answer makes of a delivery."""

_ep, _dl, _ev = n.webhook_endpoints, n.webhook_deliveries, n.outbox_events


# --- endpoints ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """A configured endpoint, as shown: never its secret."""

    id: int
    tenant: str | None
    """The tenant's key; ``None`` for a global endpoint (every tenant's events)."""
    url: str
    enabled: bool
    created_at: datetime
    created_by: str
    disabled_at: datetime | None = None


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> str:
    """``url`` if hostmeter may POST to it, else :class:`WebhookRefused` saying why."""
    shown = quote_name(url, limit=200)
    if not url or len(url) > URL_LIMIT:
        raise WebhookRefused(f"endpoint URL {shown} must be 1 to {URL_LIMIT} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise WebhookRefused(f"endpoint URL {shown} holds spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError as exc:
        raise WebhookRefused(f"endpoint URL {shown} is malformed ({exc})") from None
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise WebhookRefused(f"endpoint URL {shown} is not an https://HOST/… URL")
    if parts.scheme == "http" and not _loopback(host):
        raise WebhookRefused(f"endpoint URL {shown} must use https (plain http only to a "
                             "loopback host such as 127.0.0.1 or localhost)")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused(f"endpoint URL {shown} carries user:password@: URLs are shown by "
                             "'hostmeter webhooks endpoints'; the signature authenticates "
                             "hostmeter to the receiver")
    if parts.fragment or url.endswith("#"):
        raise WebhookRefused(f"endpoint URL {shown} has a #fragment, which is never sent")
    return url


def check_secret(secret: str) -> str:
    """The signing secret as stored: one line (a final newline, as files end, is dropped), not
    empty, at most :data:`SECRET_LIMIT` characters, no control characters. The message never
    repeats it."""
    if secret.endswith("\r\n"):
        secret = secret[:-2]
    elif secret.endswith("\n"):
        secret = secret[:-1]
    if not secret.strip():
        raise WebhookRefused("the endpoint's secret is empty")
    if len(secret) > SECRET_LIMIT:
        raise WebhookRefused(f"the endpoint's secret is longer than {SECRET_LIMIT} characters")
    if any(not ch.isprintable() for ch in secret):
        raise WebhookRefused("the endpoint's secret must be one line of printable text "
                             "(it holds a line break or a control character)")
    return secret


def _endpoints_query() -> sa.Select[Any]:
    return (sa.select(_ep.c.id, tenants.c.key.label("tenant"), _ep.c.url, _ep.c.enabled,
                      _ep.c.created_at, _ep.c.created_by, _ep.c.disabled_at)
            .select_from(_ep.outerjoin(tenants, tenants.c.id == _ep.c.tenant_id)))


def _endpoint(row: Any) -> Endpoint:
    return Endpoint(id=row.id, tenant=row.tenant, url=row.url, enabled=bool(row.enabled),
                    created_at=row.created_at, created_by=row.created_by,
                    disabled_at=row.disabled_at)


def add_endpoint(conn: Connection, *, url: str, secret: str, tenant: str | None, now: datetime,
                 created_by: str) -> Endpoint:
    """Add an enabled endpoint for ``tenant`` (``None``: global). Events queued from now on are
    fanned out to it; earlier ones are not. An enabled endpoint with the same URL for the same
    tenant (or global) is refused: it would receive every event twice."""
    url = check_url(url)
    secret = check_secret(secret)
    tenant_id = None if tenant is None else resolve_tenants(conn, [tenant])[tenant]
    same = conn.execute(
        sa.select(_ep.c.id).where(_ep.c.url == url, _ep.c.enabled.is_(True),
                                  _ep.c.tenant_id.is_(None) if tenant_id is None
                                  else _ep.c.tenant_id == tenant_id)
    ).scalar()
    if same is not None:
        whose = "every tenant's" if tenant is None else f"tenant {quote_name(tenant)}'s"
        raise WebhookRefused(f"endpoint {same} already sends {whose} events to "
                             f"{quote_name(url, limit=200)}")
    new_id = conn.execute(sa.insert(_ep).values(
        tenant_id=tenant_id, url=url, secret=secret, enabled=True, created_at=now,
        created_by=created_by, disabled_at=None).returning(_ep.c.id)).scalar_one()
    return Endpoint(id=new_id, tenant=tenant, url=url, enabled=True, created_at=now,
                    created_by=created_by)


def list_endpoints(conn: Connection, *, include_disabled: bool = True) -> list[Endpoint]:
    q = _endpoints_query().order_by(_ep.c.id)
    if not include_disabled:
        q = q.where(_ep.c.enabled.is_(True))
    return [_endpoint(r) for r in conn.execute(q)]


def remove_endpoint(conn: Connection, endpoint_id: int, *, now: datetime) -> tuple[Endpoint, int]:
    """Disable endpoint ``endpoint_id``: no event is fanned out to it any more, and its pending
    deliveries become ``dead`` ("endpoint removed"). Returns the endpoint and how many pending
    deliveries were given up. Removing a disabled endpoint again is refused."""
    row = conn.execute(_endpoints_query().where(_ep.c.id == endpoint_id)).first()
    if row is None:
        raise WebhookRefused(f"no webhook endpoint {endpoint_id} (see 'hostmeter webhooks "
                             "endpoints')")
    if not row.enabled:
        raise WebhookRefused(f"webhook endpoint {endpoint_id} was removed already")
    conn.execute(sa.update(_ep).where(_ep.c.id == endpoint_id)
                 .values(enabled=False, disabled_at=now))
    given_up = conn.execute(
        sa.update(_dl).where(_dl.c.endpoint_id == endpoint_id, _dl.c.status == "pending")
        .values(status="dead", next_attempt_at=None, last_error="endpoint removed")
    ).rowcount
    return Endpoint(
        id=row.id, tenant=row.tenant, url=row.url, enabled=False, created_at=row.created_at,
        created_by=row.created_by, disabled_at=now), given_up


# --- the retry policy (pure) -------------------------------------------------------------------


def outcome_of(status: int | None) -> Outcome:
    """What an answer with HTTP ``status`` makes of a delivery (``None``: no answer at all: a
    timeout or a connection error)."""
    if status is None:
        return "retry"
    if 200 <= status < 300:
        return "delivered"
    if status in (408, 429) or status >= 500:
        return "retry"
    return "dead"


def parse_retry_after(value: str | None, now: datetime) -> timedelta | None:
    """A ``Retry-After`` header (delay seconds or an HTTP date) as a delay from ``now``, or
    ``None`` when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return timedelta(seconds=min(int(text), 10**7))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(when - now, timedelta(0))


def retry_at(*, attempts: int, at: datetime, created_at: datetime, window: timedelta,
             retry_after: timedelta | None = None) -> datetime | None:
    """When to try again after failed attempt number ``attempts`` (1-based) made at ``at``, or
    ``None`` when the retry window (``window`` from ``created_at``) has closed: the delivery is
    ``dead``. The next attempt is never later than the window's end."""
    deadline = created_at + window
    if at >= deadline:
        return None
    if retry_after is not None:
        delay = retry_after
    else:
        exponent = min(max(attempts - 1, 0), 30)
        delay = BASE_DELAY * (2**exponent)
    delay = min(max(delay, MIN_DELAY), MAX_DELAY)
    return min(at + delay, deadline)


# --- the queue ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """One delivery to attempt, with what sending it needs."""

    id: int
    event_pk: int
    event_id: str
    type: str
    tenant_id: int
    tenant: str
    endpoint_id: int
    url: str
    secret: str = field(repr=False)
    payload: dict[str, Any] = field(repr=False)
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None

    @property
    def pair(self) -> tuple[int, int]:
        """(endpoint, tenant): deliveries of one pair leave in event order."""
        return self.endpoint_id, self.tenant_id


def _delivery_columns() -> list[Any]:
    return [_dl.c.id, _dl.c.event_pk, _ev.c.event_id, _ev.c.type, _dl.c.tenant_id,
            tenants.c.key.label("tenant"), _dl.c.endpoint_id, _ep.c.url, _ep.c.secret,
            _ev.c.payload, _dl.c.attempts, _dl.c.created_at, _dl.c.next_attempt_at]


def _delivery(row: Any) -> Delivery:
    return Delivery(id=row.id, event_pk=row.event_pk, event_id=row.event_id, type=row.type,
                    tenant_id=row.tenant_id, tenant=row.tenant, endpoint_id=row.endpoint_id,
                    url=row.url, secret=row.secret, payload=row.payload, attempts=row.attempts,
                    created_at=row.created_at, next_attempt_at=row.next_attempt_at)


def _with_event(q: sa.Select[Any]) -> sa.Select[Any]:
    return (q.join(_ev, _ev.c.id == _dl.c.event_pk)
            .join(_ep, _ep.c.id == _dl.c.endpoint_id)
            .join(tenants, tenants.c.id == _dl.c.tenant_id))


def due_heads(conn: Connection, *, now: datetime, skip_endpoints: Sequence[int] = (),
              limit: int = 1000) -> list[Delivery]:
    """The oldest pending delivery of each (endpoint, tenant) pair whose attempt is due at
    ``now``, to enabled endpoints not in ``skip_endpoints``; the longest-waiting first.

    The per-pair minimum is read from the queue index (status, endpoint, tenant, event); a
    pair whose oldest delivery is not due yet sends nothing, even if a newer one would be."""
    heads = (sa.select(_dl.c.endpoint_id, _dl.c.tenant_id,
                       sa.func.min(_dl.c.event_pk).label("event_pk"))
             .where(_dl.c.status == "pending")
             .group_by(_dl.c.endpoint_id, _dl.c.tenant_id)
             .subquery("heads"))
    q = _with_event(
        sa.select(*_delivery_columns()).select_from(_dl).join(
            heads, sa.and_(heads.c.endpoint_id == _dl.c.endpoint_id,
                           heads.c.tenant_id == _dl.c.tenant_id,
                           heads.c.event_pk == _dl.c.event_pk))
    ).where(_ep.c.enabled.is_(True), _dl.c.next_attempt_at <= now)
    if skip_endpoints:
        q = q.where(_dl.c.endpoint_id.not_in(list(skip_endpoints)))
    q = q.order_by(_dl.c.next_attempt_at, _dl.c.id).limit(limit)
    return [_delivery(r) for r in conn.execute(q)]


def next_of_pair(conn: Connection, endpoint_id: int, tenant_id: int) -> Delivery | None:
    """The oldest pending delivery of the pair (due or not), if its endpoint is enabled."""
    row = conn.execute(
        _with_event(sa.select(*_delivery_columns()).select_from(_dl))
        .where(_dl.c.status == "pending", _dl.c.endpoint_id == endpoint_id,
               _dl.c.tenant_id == tenant_id, _ep.c.enabled.is_(True))
        .order_by(_dl.c.event_pk).limit(1)
    ).first()
    return None if row is None else _delivery(row)


def record_attempt(conn: Connection, delivery: Delivery, *, at: datetime, outcome: Outcome,
                   status: int | None, error: str | None,
                   next_attempt_at: datetime | None) -> bool:
    """Write the result of one attempt of ``delivery`` (made at ``at``). Only if the row is
    still as it was read (pending, same attempts): returns ``False`` when someone else changed
    it meanwhile (a redelivery, a removed endpoint), and then writes nothing."""
    values: dict[str, Any] = {"attempts": delivery.attempts + 1, "last_attempt_at": at,
                              "last_status": status, "last_error": error}
    if outcome == "delivered":
        values |= {"status": "delivered", "delivered_at": at, "next_attempt_at": None,
                   "last_error": None}
    elif outcome == "dead" or next_attempt_at is None:
        values |= {"status": "dead", "next_attempt_at": None}
    else:
        values |= {"next_attempt_at": next_attempt_at}
    changed = conn.execute(
        sa.update(_dl).where(_dl.c.id == delivery.id, _dl.c.status == "pending",
                             _dl.c.attempts == delivery.attempts).values(**values)
    ).rowcount
    return bool(changed)


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueStats:
    """The pending deliveries left: how many, how many due, and the oldest one's age."""

    pending: int
    due: int
    oldest_age_s: float | None


def queue_stats(conn: Connection, *, now: datetime) -> QueueStats:
    row = conn.execute(
        sa.select(sa.func.count(),
                  sa.func.count(sa.case((_dl.c.next_attempt_at <= now, 1))),
                  sa.func.min(_dl.c.created_at))
        .select_from(_dl.join(_ep, _ep.c.id == _dl.c.endpoint_id))
        .where(_dl.c.status == "pending", _ep.c.enabled.is_(True))
    ).one()
    oldest = row[2]  # min() keeps the column's type: an aware UTC instant
    age = None if oldest is None else max((now - oldest).total_seconds(), 0.0)
    return QueueStats(pending=int(row[0]), due=int(row[1]),
                      oldest_age_s=None if age is None else math.floor(age * 1000) / 1000)


# --- listing and redelivery --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryRow:
    """A delivery as ``webhooks list`` shows it."""

    id: int
    event_id: str
    type: str
    tenant: str
    endpoint_id: int
    url: str
    status: str
    attempts: int
    last_status: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    last_attempt_at: datetime | None
    delivered_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {k: v.isoformat() if isinstance(v, datetime) else v
                for k, v in ((f, getattr(self, f)) for f in self.__slots__)}


def list_deliveries(conn: Connection, *, status: str | None = None, tenant: str | None = None,
                    limit: int = 50) -> list[DeliveryRow]:
    """The latest ``limit`` deliveries (newest first), of ``status`` and ``tenant`` if given."""
    columns: list[Any] = [
        _dl.c.id, _ev.c.event_id, _ev.c.type, tenants.c.key.label("tenant"), _dl.c.endpoint_id,
        _ep.c.url, _dl.c.status, _dl.c.attempts, _dl.c.last_status, _dl.c.last_error,
        _dl.c.next_attempt_at, _dl.c.created_at, _dl.c.last_attempt_at, _dl.c.delivered_at]
    q = _with_event(sa.select(*columns).select_from(_dl))
    if status is not None:
        q = q.where(_dl.c.status == status)
    if tenant is not None:
        q = q.where(_dl.c.tenant_id == resolve_tenants(conn, [tenant])[tenant])
    q = q.order_by(_dl.c.id.desc()).limit(limit)
    return [DeliveryRow(**r._mapping) for r in conn.execute(q)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Requeued:
    """A delivery put back in the queue by :func:`redeliver`."""

    id: int
    event_id: str
    endpoint_id: int
    was: str
    """Its status before: ``dead``, ``delivered`` or ``pending`` (then only made due now)."""
    attempts_before: int


def redeliver(conn: Connection, ids: Sequence[int] = (), *, all_failed: bool = False,
              tenant: str | None = None, now: datetime) -> list[Requeued]:
    """Queue deliveries ``ids`` again (or, with ``all_failed``, every ``dead`` one of enabled
    endpoints, of ``tenant`` if given): due now, with a fresh retry window; the same event id
    and body. An unknown id, or one whose endpoint was removed, is refused and nothing is
    queued."""
    q = (sa.select(_dl.c.id, _dl.c.status, _dl.c.attempts, _dl.c.endpoint_id, _ev.c.event_id,
                   _ep.c.enabled)
         .select_from(_dl.join(_ev, _ev.c.id == _dl.c.event_pk)
                      .join(_ep, _ep.c.id == _dl.c.endpoint_id)))
    if all_failed:
        q = q.where(_dl.c.status == "dead", _ep.c.enabled.is_(True))
        if tenant is not None:
            q = q.where(_dl.c.tenant_id == resolve_tenants(conn, [tenant])[tenant])
    else:
        q = q.where(_dl.c.id.in_(list(ids)))
    rows = {r.id: r for r in conn.execute(q.order_by(_dl.c.id))}
    if not all_failed:
        missing = [i for i in ids if i not in rows]
        if missing:
            raise WebhookRefused(f"no webhook delivery {missing[0]} (see 'hostmeter webhooks "
                                 "list')")
        removed = [r.id for r in rows.values() if not r.enabled]
        if removed:
            raise WebhookRefused(f"webhook delivery {removed[0]}: its endpoint was removed; add "
                                 "the endpoint again (new events go to it)")
    out = []
    for r in rows.values():
        if r.status == "pending":
            values: dict[str, Any] = {"next_attempt_at": now}
        else:
            values = {"status": "pending", "next_attempt_at": now, "created_at": now,
                      "attempts": 0, "last_status": None, "last_error": None,
                      "delivered_at": None}
        changed = conn.execute(sa.update(_dl).where(
            _dl.c.id == r.id, _dl.c.status == r.status, _dl.c.attempts == r.attempts
        ).values(**values)).rowcount
        if changed:
            out.append(Requeued(id=r.id, event_id=r.event_id, endpoint_id=r.endpoint_id,
                                was=r.status, attempts_before=r.attempts))
    return out
