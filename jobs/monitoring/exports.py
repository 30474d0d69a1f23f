"""Delivering the job metrics: Mackerel (per point, exact under failures) and the Prometheus
textfile.

Mackerel's tsdb keeps the last value posted for a (name, time), so posting a point again is
harmless and what matters is the end state: **after any sequence of failures and then a pass
that gets through, Mackerel holds the store's value for every point it still accepts** (the
last :data:`~jobs.monitoring.mackerel.MAX_AGE`). How :func:`export_mackerel` keeps that:

- **Per point, not per checkpoint.** ``export_deliveries`` keeps, per ``job_metrics`` point, the
  value Mackerel accepted. A pass sends every point whose stored value differs from it (new,
  changed by a later run in the same bucket, or brought by a late log file), and records what
  was accepted. Points older than the window are recorded ``too_old`` and not sent (one
  warning each time such a point changes).
- **Requests in doubt.** A request cut off after it was sent (read timeout, dropped connection)
  may still be applied by Mackerel later, over a newer value. Its points get ``doubt_until`` =
  when it was sent + :data:`IN_DOUBT_SETTLE`; the first pass after that sends them again.
- **A time budget per pass.** The pass ends within ``HOSTMETER_AGGREGATE_BUDGET_S`` seconds
  (default :data:`DEFAULT_BUDGET_S`): requests time out no later than it, a backoff or a
  ``Retry-After`` that does not fit ends the export, and what was not delivered is the next
  pass's. A ``Retry-After`` longer than the pass is remembered (``export_checkpoints.retry_at``)
  and the passes before it do not call Mackerel.
- **One exporter at a time.** The export holds a lock (``export:mackerel``); a pass that finds
  it taken leaves the delivery to the holder and the next pass.

An export that leaves points undelivered raises :class:`~jobs.monitoring.mackerel.MackerelError`
after recording what was delivered. Settings come from the environment and the API key is never
logged:

| variable                    | meaning                                                     |
|-----------------------------|-------------------------------------------------------------|
| MACKEREL_API_KEY            | enables the Mackerel export                                 |
| MACKEREL_API_BASE           | default ``https://api.mackerelio.com``                      |
| HOSTMETER_MACKEREL_SERVICE  | the Mackerel service (default ``hostmeter``)                |
| HOSTMETER_AGGREGATE_BUDGET_S | seconds one ``aggregate-job-logs`` pass may take (120)     |
| HOSTMETER_PROMETHEUS_TEXTFILE | where ``aggregate-job-logs`` writes the textfile          |
| HOSTMETER_EXPORT_TOP_TENANTS | tenants shown per series in Prometheus (10; 1 to 1000)     |

What goes where from the per-tenant series (:mod:`jobs.monitoring.tenants`):

- **Mackerel service metrics** get the fleet totals and the noisy count, which the log pass
  writes as ``job_metrics`` points (bucket = the UTC hour): ``hostmeter.fleet.hosts``,
  ``hostmeter.fleet.metrics``, ``hostmeter.fleet.posts`` and ``hostmeter.tenants.noisy``,
  delivered per point like every other point above (a re-snapshot that changes an hour's total
  sends that hour's point again; an unchanged point is not sent again). **No per-tenant
  points**: a tenant in a metric name is a new, never-deleted series per customer (and
  customer text, squeezed into ``[a-zA-Z0-9._-]``, where ``a.b`` and ``a_b`` collide); rank
  names (``rank_1`` … ``rank_N``) are bounded but each line jumps between tenants from hour to
  hour with nothing saying whose it is (a graph annotation per hour is not idempotent, so
  retries would duplicate it). Who the large and the noisy tenants are is in Prometheus
  (below), which the OpenTelemetry Collector (``infra/otel-collector``) forwards to Mackerel as
  labeled metrics, bounded the same way.
- **Prometheus** (:func:`prometheus_registry`, :func:`tenant_gauges`): the fleet totals and,
  per tenant, the top N of each series plus the noisiest flagged tenants (see
  :mod:`jobs.monitoring.prometheus`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from jobs.monitoring.logmetrics import job_statuses, malformed_total, months, overdue_counts
from jobs.monitoring.metricdata import MetricPoint
from jobs.monitoring.store import (
    export_checkpoints,
    export_deliveries,
    job_metrics,
    tenant_flags,
    tenant_series,
)
from jobs.runtime.errors import BadTrigger
from jobs.runtime.locks import key_lock
from metering.db import reading, upsert
from metering.display import quote_name
from metering.errors import ConfigError

__all__ = [
    "DEFAULT_BUDGET_S",
    "DEFAULT_TOP_TENANTS",
    "IN_DOUBT_SETTLE",
    "MAX_TOP_TENANTS",
    "TENANT_FRESH",
    "MackerelSettings",
    "PassBudget",
    "export_mackerel",
    "prometheus_registry",
    "tenant_gauges",
    "top_tenants_from_env",
    "write_prometheus",
]

if TYPE_CHECKING:
    from jobs.monitoring.prometheus import TenantGauges

log = structlog.get_logger("hostmeter.exports")

DEFAULT_BUDGET_S = 120.0
"""Seconds one ``aggregate-job-logs`` pass may take by default: well within its 5 minutes."""
IN_DOUBT_SETTLE = timedelta(minutes=10)
"""How long a request cut off after it was sent may still be applied by Mackerel. Its points
are sent once more after this, so that the last value to land is the store's."""
DEFAULT_TOP_TENANTS = 10
"""Tenants shown per series in Prometheus unless ``HOSTMETER_EXPORT_TOP_TENANTS`` says."""
MAX_TOP_TENANTS = 1000
"""The most ``HOSTMETER_EXPORT_TOP_TENANTS`` may be: 8,000 per-tenant series a scrape, so a
typo cannot turn the exposition into a per-customer dump."""
TENANT_FRESH = timedelta(hours=24)
"""An hour of the tenant series older than this (before the current hour) is not exported."""
_RESERVE_S = 2.0
EXPORTER = "mackerel"
_POINT_KEY = ("bucket", "name", "job", "status")


@dataclass(frozen=True, slots=True, kw_only=True)
class PassBudget:
    """The time one pass may take: from ``started`` (a :func:`time.monotonic` instant) for
    ``seconds``."""

    seconds: float
    started: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        """The :func:`time.monotonic` instant the pass's requests must end by: its end less
        a reserve (a tenth of the budget, at most :data:`_RESERVE_S`) to record what they did."""
        return self.started + self.seconds - min(_RESERVE_S, self.seconds / 10)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PassBudget:
        """``HOSTMETER_AGGREGATE_BUDGET_S`` seconds (default :data:`DEFAULT_BUDGET_S`) from now."""
        env = os.environ if env is None else env
        raw = env.get("HOSTMETER_AGGREGATE_BUDGET_S") or ""
        if not raw.strip():
            return cls(seconds=DEFAULT_BUDGET_S)
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise ConfigError(
                f"HOSTMETER_AGGREGATE_BUDGET_S must be a positive number of seconds, not {raw!r}",
                variable="HOSTMETER_AGGREGATE_BUDGET_S")  # fmt: skip
        return cls(seconds=seconds)


@dataclass(frozen=True, slots=True, kw_only=True)
class MackerelSettings:
    """Where to post; ``repr`` never shows the key."""

    api_key: str
    base_url: str = "https://api.mackerelio.com"
    service: str = "hostmeter"
    timeout_s: float = 10.0
    """The longest wait for one request (connect, send, answer); the pass budget cuts it."""

    def __repr__(self) -> str:
        return f"MackerelSettings(base_url={self.base_url!r}, service={self.service!r})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MackerelSettings | None:
        env = os.environ if env is None else env
        key = env.get("MACKEREL_API_KEY")
        if not key:
            return None
        return cls(api_key=key,
                   base_url=env.get("MACKEREL_API_BASE") or "https://api.mackerelio.com",
                   service=env.get("HOSTMETER_MACKEREL_SERVICE") or "hostmeter")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Checkpoint:
    sent_until: datetime | None
    graphs_posted: bool
    retry_at: datetime | None


def _checkpoint(conn: Connection) -> _Checkpoint:
    cp = export_checkpoints.c
    row = conn.execute(sa.select(cp.sent_until, cp.graphs_posted, cp.retry_at)
                       .where(cp.exporter == EXPORTER)).one_or_none()
    if row is None:
        return _Checkpoint(sent_until=None, graphs_posted=False, retry_at=None)
    return _Checkpoint(sent_until=row[0], graphs_posted=bool(row[1]), retry_at=row[2])


def _pending(conn: Connection, now: datetime) -> list[MetricPoint]:
    """The points to send: no value accepted yet, another value accepted, or a doubt settled."""
    m, d = job_metrics, export_deliveries
    joined = m.outerjoin(d, sa.and_(d.c.exporter == EXPORTER,
                                    *(d.c[k] == m.c[k] for k in _POINT_KEY)))
    rows = conn.execute(
        sa.select(m.c.name, m.c.bucket, m.c.job, m.c.status, m.c.value).select_from(joined)
        .where(sa.or_(d.c.value.is_(None), d.c.value != m.c.value,
                      sa.and_(d.c.doubt_until.is_not(None), d.c.doubt_until <= now)))
        .order_by(m.c.bucket, m.c.name, m.c.job, m.c.status)).all()
    return [MetricPoint(name=r.name, time=r.bucket, value=Decimal(r.value),
                        labels={k: v for k, v in (("job", r.job), ("status", r.status)) if v})
            for r in rows]


def _key(p: MetricPoint) -> tuple[datetime, str, str, str]:
    return (p.time, p.name, p.labels.get("job", ""), p.labels.get("status", ""))


def _record(conn: Connection, *, now: datetime, delivered: Iterable[MetricPoint],
            in_doubt: Iterable[MetricPoint], too_old: Iterable[MetricPoint],
            doubt_until: datetime) -> None:
    """Write what this pass did to each point it touched (see ``export_deliveries``)."""
    accepted = {_key(p): p for p in delivered}
    doubted = {_key(p): p for p in in_doubt}
    old = {_key(p): p for p in too_old}
    touched = accepted.keys() | doubted.keys() | old.keys()
    if not touched:
        return
    d = export_deliveries.c
    existing: dict[tuple[datetime, str, str, str], Any] = {}
    buckets = sorted({k[0] for k in touched})
    for i in range(0, len(buckets), 500):
        for row in conn.execute(sa.select(export_deliveries).where(
                d.exporter == EXPORTER, d.bucket.in_(buckets[i : i + 500]))):
            existing[(row.bucket, row.name, row.job, row.status)] = row
    rows = []
    for key in sorted(touched):
        prior = existing.get(key)
        # a doubt not yet settled when this pass started outlives whatever the pass did
        doubt = prior.doubt_until if prior is not None and prior.doubt_until is not None \
            and prior.doubt_until > now else None
        if key in doubted:
            doubt = max(doubt, doubt_until) if doubt is not None else doubt_until
        if key in old:
            value, outcome, doubt = old[key].value, "too_old", None
        elif key in accepted:
            value, outcome = accepted[key].value, "delivered"
        elif prior is not None:  # cut off: whatever was accepted before is still the record
            value, outcome = prior.value, prior.outcome
        else:
            value, outcome = None, "in_doubt"
        bucket, name, job, status = key
        rows.append({"exporter": EXPORTER, "bucket": bucket, "name": name, "job": job,
                     "status": status, "value": value, "outcome": outcome,
                     "doubt_until": doubt, "updated_at": now})
    upsert(conn, export_deliveries, rows, key=["exporter", *_POINT_KEY],
           update=["value", "outcome", "doubt_until", "updated_at"])


def _save_checkpoint(conn: Connection, cp: _Checkpoint, now: datetime) -> None:
    upsert(conn, export_checkpoints, [{"exporter": EXPORTER, "sent_until": cp.sent_until,
                                       "graphs_posted": cp.graphs_posted,
                                       "retry_at": cp.retry_at, "updated_at": now}],
           key=["exporter"], update=["sent_until", "graphs_posted", "retry_at", "updated_at"])


def export_mackerel(engine: Engine, settings: MackerelSettings, *, now: datetime,
                    client: Any = None, budget: PassBudget | None = None,
                    settle: timedelta = IN_DOUBT_SETTLE) -> dict[str, Any]:
    """Post every point Mackerel does not hold yet (or may hold wrongly), within ``budget``
    (default: ``HOSTMETER_AGGREGATE_BUDGET_S`` from now); record what it accepted.

    Raises :class:`~jobs.monitoring.mackerel.MackerelError` when points are left for the next
    pass (after recording what was delivered)."""
    budget = budget if budget is not None else PassBudget.from_env()
    with key_lock(engine, f"export:{EXPORTER}") as locked:
        if not locked:
            log.warning("mackerel_export_busy", service=settings.service)
            return {"mackerel_sent": 0, "mackerel_busy": True}
        return _export_locked(engine, settings, now=now, client=client, budget=budget,
                              settle=settle)


def _export_locked(engine: Engine, settings: MackerelSettings, *, now: datetime, client: Any,
                   budget: PassBudget, settle: timedelta) -> dict[str, Any]:
    from jobs.monitoring.mackerel import ExportResult, MackerelError, MackerelExporter

    with reading(engine) as conn:
        cp = _checkpoint(conn)
        points = _pending(conn, now)
    if cp.retry_at is not None and now < cp.retry_at and points:
        log.warning("mackerel_waiting", service=settings.service, pending=len(points),
                    retry_at=cp.retry_at.isoformat())
        raise MackerelError(f"Mackerel asked not to be called before {cp.retry_at.isoformat()}; "
                            f"{len(points)} points wait for a later pass", status=429,
                            sent_until=None, retry_at=cp.retry_at)  # fmt: skip
    exporter = MackerelExporter(settings.api_key, settings.service, base_url=settings.base_url,
                                client=client, timeout_s=settings.timeout_s, clock=lambda: now)
    error: MackerelError | None = None
    result: ExportResult | None = None
    graphs = cp.graphs_posted
    try:
        try:
            result = exporter.export(points, deadline=budget.deadline)
        except MackerelError as exc:
            error = exc
            result = exc.partial
        if error is None and not graphs:
            try:
                graphs = exporter.post_graph_definitions(deadline=budget.deadline)
            except MackerelError as exc:
                error = exc
    finally:
        exporter.close()
    # every request of this pass was sent by now: a cut-off one may land until settle from now
    doubt_until = now + timedelta(seconds=budget.elapsed()) + settle
    newest = max((p.time for p in result.delivered), default=None) if result else None
    with engine.begin() as conn:
        if result is not None:
            _record(conn, now=now, delivered=result.delivered, in_doubt=result.in_doubt,
                    too_old=result.too_old, doubt_until=doubt_until)
        _save_checkpoint(conn, _Checkpoint(
            sent_until=max(filter(None, (cp.sent_until, newest)), default=None),
            graphs_posted=graphs, retry_at=error.retry_at if error is not None else None,
        ), now)
    if error is not None:
        raise error
    assert result is not None
    return {"mackerel_sent": result.sent, "mackerel_skipped_old": result.skipped_old,
            "mackerel_in_doubt": len(result.in_doubt)}


def top_tenants_from_env(env: Mapping[str, str] | None = None) -> int:
    """``HOSTMETER_EXPORT_TOP_TENANTS``: a whole number from 1 to :data:`MAX_TOP_TENANTS`
    (default :data:`DEFAULT_TOP_TENANTS`), or a one-line :class:`ConfigError`."""
    env = os.environ if env is None else env
    raw = env.get("HOSTMETER_EXPORT_TOP_TENANTS") or ""
    if not raw.strip():
        return DEFAULT_TOP_TENANTS
    try:
        top = int(raw)
    except ValueError:
        top = 0
    if not 1 <= top <= MAX_TOP_TENANTS:
        raise ConfigError(
            f"HOSTMETER_EXPORT_TOP_TENANTS must be a whole number from 1 to {MAX_TOP_TENANTS}, "
            f"not {quote_name(raw, limit=40)}", setting="HOSTMETER_EXPORT_TOP_TENANTS")
    return top


def _newest_hour(conn: Connection, series: str, *, before: datetime) -> datetime | None:
    """The newest hour of ``series`` in [``before`` - :data:`TENANT_FRESH`, ``before``): one
    descending seek on the primary key (series, hour, tenant)."""
    s = tenant_series
    hour: datetime | None = conn.execute(
        sa.select(s.c.hour).where(s.c.series == series, s.c.hour < before,
                                  s.c.hour >= before - TENANT_FRESH)
        .order_by(s.c.hour.desc()).limit(1)).scalar_one_or_none()
    return hour


def tenant_gauges(conn: Connection, *, now: datetime, top: int) -> TenantGauges:
    """The :class:`~jobs.monitoring.prometheus.TenantGauges` at ``now``: each series' newest
    complete hour (``hosts``/``metrics``/flags: the snapshot hour), its fleet total, its ``top``
    largest tenants, and the ``top`` noisiest tenants flagged in the snapshot hour (by value /
    trailing median; ties by name) with all their values. Reads a few hours of the primary key
    and the flags' hour index, whatever the history."""
    from jobs.monitoring.prometheus import TENANT_SERIES, TenantGauges
    from jobs.monitoring.tenants import top_tenants

    current = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    snapshot = _newest_hour(conn, "hosts", before=current)
    hours = {"hosts": snapshot, "metrics": snapshot,
             "posts": _newest_hour(conn, "posts", before=current)}
    noisiest: dict[str, Decimal] = {}
    flags: list[tuple[str, str]] = []
    if snapshot is not None:
        f = tenant_flags
        for tenant, series, value, median in conn.execute(
                sa.select(f.c.tenant, f.c.series, f.c.value, f.c.median)
                .where(f.c.hour == snapshot)):
            ratio = Decimal(value) / Decimal(median) if median else Decimal("Infinity")
            noisiest[tenant] = max(ratio, noisiest.get(tenant, ratio))
            flags.append((tenant, series))
    shown = sorted(noisiest, key=lambda t: (-noisiest[t], t))[:top]
    s = tenant_series
    fleet: dict[str, int] = {}
    values: dict[str, dict[str, int]] = {}
    for series in TENANT_SERIES:
        hour = hours[series]
        if hour is None:
            continue
        here = sa.and_(s.c.series == series, s.c.hour == hour)
        fleet[series] = int(conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(s.c.value), 0)).where(here)).scalar_one())
        values[series] = dict(top_tenants(conn, series, hour, top))
        missing = [t for t in shown if t not in values[series]]
        if missing:
            values[series].update((t, int(v)) for t, v in conn.execute(
                sa.select(s.c.tenant, s.c.value).where(here, s.c.tenant.in_(missing))))
    return TenantGauges(
        hours={k: v for k, v in hours.items() if v is not None}, fleet=fleet,
        noisy=len(noisiest) if snapshot is not None else None, tenants=values,
        flagged=tuple(sorted(flag for flag in flags if flag[0] in set(shown))))


def prometheus_registry(engine: Engine, zone: Any, *, now: datetime | None = None,
                        top: int | None = None) -> Any:
    """A fresh registry of the current job statuses, overdue runs (at ``now``, default the wall
    clock), billing months and tenant gauges (``top`` tenants per series, default
    ``HOSTMETER_EXPORT_TOP_TENANTS``)."""
    from jobs.monitoring.prometheus import build_registry

    now = now or datetime.now(UTC)
    top = top if top is not None else top_tenants_from_env()
    with reading(engine) as conn:
        overdue = overdue_counts(conn, now)
        tenants = tenant_gauges(conn, now=now, top=top)
    return build_registry(job_statuses(engine), months(engine, zone),
                          malformed_lines=malformed_total(engine), overdue=overdue,
                          tenants=tenants)


def write_prometheus(engine: Engine, zone: Any, path: Path, *,
                     now: datetime | None = None) -> dict[str, Any]:
    from jobs.monitoring.prometheus import write_textfile

    if not path.parent.is_dir():
        raise BadTrigger(f"textfile directory {path.parent} does not exist", path=str(path))
    write_textfile(str(path), prometheus_registry(engine, zone, now=now))
    return {"prometheus_textfile": str(path)}
