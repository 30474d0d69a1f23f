"""Budget alerts: a threshold per tenant on the projected month, and one event when the
projection crosses it.

A tenant has at most one alert per measure (``budget_alerts``): ``amount`` (the projected
invoice total, in currency units: ``50000`` JPY, ``120.50`` USD), ``standard_units`` or
``micro_units`` (projected units). A threshold is greater than zero and below 10¹²; an amount
has at most the currency's decimals.

**Crossing.** An alert is *crossed* when the projected value is **greater than or equal to**
its threshold (a projection of exactly 50000 crosses a threshold of 50000). The value is the
projection of a ``usage_estimates`` row: ``projected_total`` (minor units → currency units,
exactly) for ``amount``, ``projected_standard_units`` / ``projected_micro_units`` for units.

State machine, per (alert, period), in ``budget_alert_states`` (no row = never evaluated)::

    (no state) ── under ──► under (crossings 0)            no event
    (no state) ── over ───► crossed (crossings 1)          usage.threshold #1
    under      ── over ───► crossed (crossings n+1)        usage.threshold #n+1 (a new id)
    crossed    ── over ───► crossed                        no event (value and as_of updated)
    crossed    ── under ──► under (crossings n)            usage.threshold_cleared #n
    under      ── under ──► under                          no event

- **The latest word wins.** Each state remembers the ``as_of`` of the estimate that set it; an
  evaluation with an older ``as_of`` (a backfill of a past hour) changes nothing. One with the
  same ``as_of`` (a rerun of the same hour) is applied: a rerun can take an alert back down.
- **A vanished tenant.** ``evaluate(..., complete=True)`` says the estimates are every paying
  tenant's: an alert whose tenant has none (a rerun removed its paid hours) is evaluated at 0,
  so a crossed one is cleared.
- **A new period starts with no state**: the month's change sends nothing; a tenant already
  over in the first estimate of the month gets its ``usage.threshold`` then.
- **Setting** an alert, or changing its threshold, evaluates it at once against the tenant's
  latest stored estimate of the current period, in the same transaction: lowering a threshold
  under the projection raises ``usage.threshold`` now, raising it above a crossed projection
  clears it now. **Removing** an alert sends nothing (its states go with it).

Events go through :func:`billing.outbox.enqueue` in the caller's transaction (a rollback
leaves neither state nor event). An event's identity (its key, hence its id) is the tenant,
the alert (its id and creation instant), the period and the crossing's number, so each
crossing is announced once and a second crossing is a new event. ``data`` of both events::

    {"period": "2026-10", "measure": "amount", "threshold": "50000", "value": "54990",
     "currency": "JPY", "as_of": "2026-10-20T06:00:00+00:00", "crossing": 1,
     "projected": {"standard_units": 30, "micro_units": 0, "total": "54990"},
     "month_to_date": {"standard_units": 19, "micro_units": 0, "total": "34827"}}

``threshold`` and ``value`` are decimal strings in the measure's unit (currency units for
``amount``: the currency's decimals; whole numbers for units); totals are decimal strings in
currency units; ``crossing`` is the crossing's number in the period (a cleared event names the
crossing it ends).

Set-based: :func:`evaluate` reads the alerts of the tenants concerned with one statement (it
locks them on PostgreSQL, so two evaluations of one alert take turns) and their states with a
second, whatever the number of tenants; it writes the changed states with one upsert and the
events with :func:`~billing.outbox.enqueue`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from billing import notices as n
from billing.catalog import catalog_for
from billing.errors import InvalidThreshold
from billing.outbox import Event, enqueue
from billing.repository import resolve_tenants
from billing.rules import to_decimal
from metering import models as m
from metering.db import upsert
from metering.display import quote_name
from metering.timeutil import as_utc, period_of

__all__ = [
    "MAX_THRESHOLD",
    "MEASURES",
    "Alert",
    "AlertSet",
    "decimal_text",
    "evaluate",
    "list_alerts",
    "parse_threshold",
    "remove_alert",
    "set_alert",
]

MEASURES = n.ALERT_MEASURES
MAX_THRESHOLD = Decimal(10) ** 12
"""Thresholds are below this: with the currency's few decimals a threshold has at most 15
significant digits, which SQLite's ``NUMERIC`` (a double) keeps exactly."""

_TENANTS_IN_STATEMENT = 1000  # more tenants than this: read every alert (one statement still)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """One alert and its state in the latest period evaluated (``period`` None: never
    evaluated)."""

    id: int
    tenant: str
    measure: str
    threshold: Decimal
    created_at: datetime
    updated_at: datetime
    updated_by: str
    period: str | None = None
    crossed: bool = False
    crossings: int = 0
    value: Decimal | None = None
    as_of: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant, "measure": self.measure,
            "threshold": decimal_text(self.threshold),
            "period": self.period, "crossed": self.crossed, "crossings": self.crossings,
            "value": None if self.value is None else decimal_text(self.value),
            "as_of": None if self.as_of is None else self.as_of.isoformat(),
            "updated_at": self.updated_at.isoformat(), "updated_by": self.updated_by,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertSet:
    """What :func:`set_alert` did: the alert as it stands now (its state in ``period``),
    whether it is new, its threshold before, and the event the change raised (``None``, or
    ``usage.threshold`` / ``usage.threshold_cleared``)."""

    alert: Alert
    period: str
    created: bool
    previous: Decimal | None
    event: str | None
    estimated: bool  # the period has an estimate for the tenant (else: nothing to compare)


# --- thresholds ------------------------------------------------------------------------------


def decimal_text(value: Decimal) -> str:
    """A decimal as plain text without exponent or trailing zeros: 50000, 120.5."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def _quantum(places: int) -> Decimal:
    return Decimal(1).scaleb(-places)


def parse_threshold(measure: str, text: str | Decimal, *, minor_units: int,
                    currency: str = "") -> Decimal:
    """``text`` as a threshold for ``measure``, or :class:`InvalidThreshold`: a plain decimal
    number greater than zero and below :data:`MAX_THRESHOLD`; an amount has at most
    ``minor_units`` decimals (trailing zeros allowed), units are whole numbers."""
    if measure not in MEASURES:
        raise InvalidThreshold(f"unknown alert measure {measure!r} (one of: "
                               f"{', '.join(MEASURES)})", measure=measure)
    what = "--amount" if measure == "amount" else f"--{measure.replace('_', '-')}"
    if isinstance(text, Decimal):
        value = text
        if not value.is_finite():
            raise InvalidThreshold(f"{what} must be a number", measure=measure)
    else:
        raw = text.strip()
        if not _NUMBER.match(raw):
            raise InvalidThreshold(f"{what} {quote_name(text)} is not a number (write it "
                                   "like 50000 or 120.50)", measure=measure)
        try:
            value = Decimal(raw)
        except InvalidOperation as exc:  # pragma: no cover - the pattern admits only numbers
            raise InvalidThreshold(f"{what} {quote_name(text)} is not a number",
                                   measure=measure) from exc
    if value < 0:
        raise InvalidThreshold(f"{what} must not be negative (got {decimal_text(value)})",
                               measure=measure)
    if value == 0:
        raise InvalidThreshold(f"{what} must be greater than zero (a projection of 0 would "
                               "already reach it)", measure=measure)
    if value >= MAX_THRESHOLD:
        raise InvalidThreshold(f"{what} must be below {decimal_text(MAX_THRESHOLD)} (got "
                               f"{decimal_text(value)})", measure=measure)
    places = minor_units if measure == "amount" else 0
    if value != value.quantize(_quantum(places)):
        if measure != "amount":
            why = "units are whole numbers"
        elif places:
            why = f"{currency or 'the currency'} has {places} decimal(s)"
        else:
            why = f"{currency or 'the currency'} has no decimals"
        raise InvalidThreshold(f"{what} {decimal_text(value)}: {why}", measure=measure)
    return value.quantize(_quantum(places))


# --- reading ---------------------------------------------------------------------------------


def _decimal(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """``column`` read as its exact decimal text. SQLite keeps ``NUMERIC`` as a double, and
    SQLAlchemy would format it with the column's six places (123.45 → 123.450000000001);
    SQLite's own text of the double is exact for the 15 significant digits a threshold has.
    PostgreSQL's ``numeric`` is exact either way."""
    return sa.cast(column, sa.String).label(column.name)


def _dec(text: Any) -> Decimal:
    return Decimal(str(text))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Loaded:
    id: int
    tenant_id: int
    tenant: str
    measure: str
    threshold: Decimal
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class _State:
    crossed: bool
    crossings: int
    value: Decimal
    as_of: datetime
    changed_at: datetime


def _load(conn: Connection, period: str, tenant_ids: Sequence[int], *, complete: bool,
          alert_ids: Sequence[int] | None) -> tuple[list[_Loaded], dict[int, _State]]:
    """The alerts of ``tenant_ids`` (with ``complete``, also every alert with a state in
    ``period``), locked on PostgreSQL, and their states in ``period``: two statements.

    Up to :data:`_TENANTS_IN_STATEMENT` tenants are named in an ``IN`` list; beyond, every
    alert is read and filtered here (alerts are a few per tenant that set any, and an ``IN``
    list of 20,000 ids would pass the drivers' bound-parameter limits)."""
    a, s, t = n.budget_alerts, n.budget_alert_states, m.tenants
    wanted = set(tenant_ids)
    in_period = sa.select(s.c.alert_id).where(s.c.period == period)
    q = (sa.select(a.c.id, a.c.tenant_id, t.c.key, a.c.measure, _decimal(a.c.threshold),
                   a.c.created_at)
         .join(t, t.c.id == a.c.tenant_id)
         .order_by(a.c.id)
         .with_for_update(of=a))
    few = len(wanted) <= _TENANTS_IN_STATEMENT
    if alert_ids is not None:
        q = q.where(a.c.id.in_(list(alert_ids)))
    elif few:
        cond: sa.ColumnElement[bool] = a.c.tenant_id.in_(sorted(wanted))
        q = q.where(sa.or_(cond, a.c.id.in_(in_period)) if complete else cond)
    alerts = [
        _Loaded(id=r.id, tenant_id=r.tenant_id, tenant=r.key, measure=r.measure,
                threshold=_dec(r.threshold), created_at=as_utc(r.created_at))
        for r in conn.execute(q)
    ]
    if not few and alert_ids is None:
        alerts = [x for x in alerts if x.tenant_id in wanted or complete]
    if not alerts:
        return [], {}
    # After the lock: on PostgreSQL this statement sees what a concurrent evaluation of the
    # same alerts committed before it let go of them.
    sq = (sa.select(s.c.alert_id, s.c.crossed, s.c.crossings, _decimal(s.c.value), s.c.as_of,
                    s.c.changed_at)
          .where(s.c.period == period))
    if len(alerts) <= _TENANTS_IN_STATEMENT:
        sq = sq.where(s.c.alert_id.in_([x.id for x in alerts]))
    ids = {x.id for x in alerts}
    states = {
        r.alert_id: _State(crossed=bool(r.crossed), crossings=r.crossings, value=_dec(r.value),
                           as_of=as_utc(r.as_of), changed_at=as_utc(r.changed_at))
        for r in conn.execute(sq) if r.alert_id in ids
    }
    if complete and alert_ids is None:
        # a tenant with neither an estimate nor a state this period has nothing to say
        alerts = [x for x in alerts if x.tenant_id in wanted or x.id in states]
    return alerts, states


# --- evaluating ------------------------------------------------------------------------------


def _value(measure: str, estimate: Mapping[str, Any] | None) -> Decimal:
    if estimate is None:
        return Decimal(0)
    if measure == "amount":
        return to_decimal(int(estimate["projected_total"]), int(estimate["minor_units"]))
    return Decimal(int(estimate[f"projected_{measure}"]))


def _data(alert: _Loaded, *, period: str, as_of: datetime, value: Decimal, crossing: int,
          estimate: Mapping[str, Any] | None, currency: str, minor_units: int
          ) -> dict[str, Any]:
    places = minor_units if alert.measure == "amount" else 0

    def units(prefix: str) -> dict[str, Any]:
        e = estimate or {}
        return {"standard_units": int(e.get(f"{prefix}_standard_units", 0)),
                "micro_units": int(e.get(f"{prefix}_micro_units", 0)),
                "total": str(to_decimal(int(e.get(f"{prefix}_total", 0)), minor_units))}

    return {
        "period": period,
        "measure": alert.measure,
        "threshold": str(alert.threshold.quantize(_quantum(places))),
        "value": str(value.quantize(_quantum(places))),
        "currency": currency,
        "as_of": as_of.isoformat(),
        "crossing": crossing,
        "projected": units("projected"),
        "month_to_date": units("mtd"),
    }


def _event_key(kind: str, alert: _Loaded, period: str, crossing: int) -> str:
    # The alert's creation instant is part of its identity: SQLite may give a removed alert's
    # id to the next one, whose first crossing is a new fact.
    created = int(alert.created_at.timestamp() * 1_000_000)
    return f"{kind}:{alert.tenant}:{alert.id}.{created}:{period}:{crossing}"


def evaluate(conn: Connection, *, period: str, as_of: datetime,
             estimates: Sequence[Mapping[str, Any]], now: datetime, run_id: str | None,
             complete: bool) -> dict[str, int]:
    """Evaluate the alerts of the tenants in ``estimates`` (``usage_estimates`` rows by
    column name, plus ``"tenant"``, the tenant's key) for ``period`` as of ``as_of``, in the
    caller's transaction: update their states and enqueue one event per crossing or clearing
    (see the module docstring). With ``complete``, ``estimates`` are every paying tenant's:
    an alert whose tenant is missing is evaluated at 0.

    Returns counts: ``alerts_evaluated``, ``alerts_crossed`` and ``alerts_cleared`` (events
    enqueued), ``alerts_stale`` (skipped: their state is newer than ``as_of``) and
    ``webhook_deliveries`` (queued for the events)."""
    return _evaluate(conn, period=period, as_of=as_utc(as_of), estimates=estimates,
                     now=now, run_id=run_id, complete=complete, alert_ids=None)


def _evaluate(conn: Connection, *, period: str, as_of: datetime,
              estimates: Sequence[Mapping[str, Any]], now: datetime, run_id: str | None,
              complete: bool, alert_ids: Sequence[int] | None) -> dict[str, int]:
    by_tenant = {int(e["tenant_id"]): e for e in estimates}
    counts = {"alerts_evaluated": 0, "alerts_crossed": 0, "alerts_cleared": 0,
              "alerts_stale": 0, "webhook_deliveries": 0}
    alerts, states = _load(conn, period, list(by_tenant), complete=complete,
                           alert_ids=alert_ids)
    fallback: tuple[str, int] | None = None  # the period's currency, for a vanished tenant
    rows: list[dict[str, Any]] = []
    events: list[Event] = []
    for alert in alerts:
        state = states.get(alert.id)
        if state is not None and state.as_of > as_of:
            counts["alerts_stale"] += 1
            continue
        estimate = by_tenant.get(alert.tenant_id)
        counts["alerts_evaluated"] += 1
        value = _value(alert.measure, estimate)
        over = value >= alert.threshold
        was = state is not None and state.crossed
        crossings = state.crossings if state is not None else 0
        kind = None
        if over and not was:
            crossings += 1
            kind = "usage.threshold"
        elif was and not over:
            kind = "usage.threshold_cleared"
        if kind is None and state is not None and (state.value, state.as_of) == (value, as_of):
            continue
        rows.append({"alert_id": alert.id, "period": period, "crossed": over,
                     "crossings": crossings, "value": value, "as_of": as_of,
                     "changed_at": now if kind or state is None else state.changed_at})
        if kind is None:
            continue
        if estimate is not None:
            currency, minor = str(estimate["currency"]), int(estimate["minor_units"])
        else:
            if fallback is None:
                catalog = catalog_for(period)
                fallback = (catalog.currency, catalog.minor_units)
            currency, minor = fallback
        counts["alerts_crossed" if kind == "usage.threshold" else "alerts_cleared"] += 1
        events.append(Event(
            type=kind, tenant=alert.tenant, tenant_id=alert.tenant_id,
            key=_event_key(kind, alert, period, crossings),
            data=_data(alert, period=period, as_of=as_of, value=value, crossing=crossings,
                       estimate=estimate, currency=currency, minor_units=minor)))
    upsert(conn, n.budget_alert_states, rows, key=("alert_id", "period"),
           update=("crossed", "crossings", "value", "as_of", "changed_at"))
    events.sort(key=lambda e: (e.tenant_id, e.key))
    counts["webhook_deliveries"] = enqueue(conn, events, now=now, run_id=run_id)
    return counts


# --- managing alerts -------------------------------------------------------------------------


def _latest_estimate(conn: Connection, tenant_id: int, period: str) -> dict[str, Any] | None:
    e = n.usage_estimates
    row = conn.execute(
        sa.select(e).where(e.c.period == period, e.c.tenant_id == tenant_id)
        .order_by(e.c.as_of.desc()).limit(1)
    ).mappings().first()
    return None if row is None else dict(row)


def set_alert(conn: Connection, *, tenant: str, measure: str, threshold: Decimal,
              now: datetime, actor: str, zone: ZoneInfo) -> AlertSet:
    """Set ``tenant``'s ``measure`` threshold (insert or update), then evaluate it against
    the tenant's latest stored estimate of the period ``now`` falls in (``zone``: the billing
    time zone), in the caller's transaction.

    Raises :class:`~billing.errors.UnknownTenant` and
    :class:`~billing.errors.InvalidThreshold` (see :func:`parse_threshold`)."""
    period = period_of(now, zone)
    catalog = catalog_for(period)
    threshold = parse_threshold(measure, threshold, minor_units=catalog.minor_units,
                                currency=catalog.currency)
    tenant_id = resolve_tenants(conn, [tenant])[tenant]
    a = n.budget_alerts
    found = conn.execute(
        sa.select(a.c.id, _decimal(a.c.threshold))
        .where(a.c.tenant_id == tenant_id, a.c.measure == measure)
        .with_for_update()
    ).first()
    previous = None if found is None else _dec(found.threshold)
    if found is None:
        alert_id = conn.execute(
            sa.insert(a).values(tenant_id=tenant_id, measure=measure, threshold=threshold,
                                created_at=now, updated_at=now, updated_by=actor)
            .returning(a.c.id)
        ).scalar_one()
    else:
        alert_id = found.id
        if previous != threshold:
            conn.execute(sa.update(a).where(a.c.id == alert_id)
                         .values(threshold=threshold, updated_at=now, updated_by=actor))
    estimate = _latest_estimate(conn, tenant_id, period)
    event = None
    if estimate is not None:
        estimate["tenant"] = tenant
        counts = _evaluate(conn, period=period, as_of=as_utc(estimate["as_of"]),
                           estimates=[estimate], now=now, run_id=None, complete=False,
                           alert_ids=[alert_id])
        event = ("usage.threshold" if counts["alerts_crossed"]
                 else "usage.threshold_cleared" if counts["alerts_cleared"] else None)
    [alert] = _alerts(conn, alert_ids=[alert_id], period=period)
    return AlertSet(alert=alert, period=period, created=found is None, previous=previous,
                    event=event, estimated=estimate is not None)


def remove_alert(conn: Connection, *, tenant: str, measure: str | None = None) -> list[str]:
    """Remove ``tenant``'s alert on ``measure`` (``None``: all its alerts) with their states.
    Sends nothing. Returns the measures removed (empty when there was none)."""
    if measure is not None and measure not in MEASURES:
        raise InvalidThreshold(f"unknown alert measure {measure!r} (one of: "
                               f"{', '.join(MEASURES)})", measure=measure)
    tenant_id = resolve_tenants(conn, [tenant])[tenant]
    a, s = n.budget_alerts, n.budget_alert_states
    where = [a.c.tenant_id == tenant_id]
    if measure is not None:
        where.append(a.c.measure == measure)
    found = conn.execute(sa.select(a.c.id, a.c.measure).where(*where)).all()
    if not found:
        return []
    ids = [r.id for r in found]
    conn.execute(sa.delete(s).where(s.c.alert_id.in_(ids)))
    conn.execute(sa.delete(a).where(a.c.id.in_(ids)))
    return sorted((r.measure for r in found), key=MEASURES.index)


def list_alerts(conn: Connection, tenants: Sequence[str] | None = None) -> list[Alert]:
    """Every alert (or ``tenants``' alerts), each with its state in the latest period it has
    one, ordered by tenant and measure. An unknown tenant key raises
    :class:`~billing.errors.UnknownTenant`."""
    ids = list(resolve_tenants(conn, tenants).values()) if tenants else None
    return _alerts(conn, tenant_ids=ids)


def _alerts(conn: Connection, *, tenant_ids: Sequence[int] | None = None,
            alert_ids: Sequence[int] | None = None, period: str | None = None) -> list[Alert]:
    """Alerts with their state in ``period`` (default: each alert's latest period)."""
    a, s, t = n.budget_alerts, n.budget_alert_states, m.tenants
    if period is None:
        later = s.alias("later")
        latest = (sa.select(sa.func.max(later.c.period)).where(later.c.alert_id == a.c.id)
                  .scalar_subquery())
        on = sa.and_(s.c.alert_id == a.c.id, s.c.period == latest)
    else:
        on = sa.and_(s.c.alert_id == a.c.id, s.c.period == period)
    q = (sa.select(a.c.id, t.c.key, a.c.measure, _decimal(a.c.threshold), a.c.created_at,
                   a.c.updated_at, a.c.updated_by, s.c.period, s.c.crossed, s.c.crossings,
                   _decimal(s.c.value), s.c.as_of)
         .join(t, t.c.id == a.c.tenant_id)
         .outerjoin(s, on))
    if tenant_ids is not None:
        q = q.where(a.c.tenant_id.in_(list(tenant_ids)))
    if alert_ids is not None:
        q = q.where(a.c.id.in_(list(alert_ids)))
    out = [
        Alert(id=r.id, tenant=r.key, measure=r.measure, threshold=_dec(r.threshold),
              created_at=as_utc(r.created_at), updated_at=as_utc(r.updated_at),
              updated_by=r.updated_by, period=r.period, crossed=bool(r.crossed),
              crossings=r.crossings or 0,
              value=None if r.value is None else _dec(r.value),
              as_of=None if r.as_of is None else as_utc(r.as_of))
        for r in conn.execute(q)
    ]
    return sorted(out, key=lambda x: (x.tenant, MEASURES.index(x.measure)))
