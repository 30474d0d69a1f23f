"""Per-tenant series from the jobs' per-item events: capacity, and noisy neighbours.

The jobs log one line per item they process (``snapshot-usage``: ``tenant_hour`` per tenant-hour
it freezes; ``hostmeter ingest``: ``tenant_ingested`` per tenant of an input). The log pass
(:func:`jobs.monitoring.logmetrics.aggregate`) hands those lines to a :class:`TenantEvents`,
which keeps, in ``tenant_series``, per tenant and UTC hour:

- ``hosts`` (standard + micro) and ``metrics`` of the snapshotted tenant-hour — the latest
  snapshot of the hour wins (its line's timestamp), so a look-back re-snapshot replaces them;
- ``posts`` ingested, summed over the ``tenant_ingested`` lines of the hour (each line is read
  once: the checkpoints follow a file through rotation and truncation).

Then, for the tenant-hours the pass touched only:

- **fleet totals** (capacity): ``hostmeter.fleet.hosts`` / ``.metrics`` / ``.posts`` per hour, the
  sums over tenants, in ``job_metrics`` (exported with the job metrics);
- **noisy neighbours**: a tenant-hour whose ``hosts`` or ``metrics`` is at least
  :attr:`NoisyRule.factor` times the tenant's median over the :attr:`NoisyRule.window_hours`
  hours before it (at least :attr:`NoisyRule.min_points` of them, and the value at least
  :attr:`NoisyRule.min_value`) is flagged in ``tenant_flags``; a later snapshot that takes the
  value back down clears it. ``hostmeter.tenants.noisy`` counts the flagged tenants per hour.
  The trailing median is computed over the touched tenants' windows only (read back for them),
  never over the whole history.

Defaults (``HOSTMETER_NOISY_FACTOR``, ``HOSTMETER_NOISY_WINDOW_HOURS``,
``HOSTMETER_NOISY_MIN_POINTS``, ``HOSTMETER_NOISY_MIN_VALUE``): 3×, 24 hours, 6 hours, 10.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from statistics import median
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from jobs.monitoring.store import job_metrics, tenant_flags, tenant_series
from metering.db import bulk_insert, upsert
from metering.errors import ConfigError
from metering.timeutil import floor_hour

__all__ = ["FLEET_METRICS", "NOISY", "SERIES", "NoisyRule", "TenantEvents", "log_instant",
           "log_raised"]

SERIES = ("hosts", "metrics", "posts")
FLEET_METRICS = {s: f"hostmeter.fleet.{s}" for s in SERIES}
NOISY = "hostmeter.tenants.noisy"
FLAGGED_SERIES = ("hosts", "metrics")
HOLD = 20_000
"""Tenant-hour values held before they are written."""
REFRESH = 50_000
"""Touched tenant-hours whose fleet totals and flags are refreshed at once (a first pass over a
long history refreshes as it goes, in the order the lines come, so memory stays flat)."""
_CHUNK = 500
HOUR = timedelta(hours=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class NoisyRule:
    """When a tenant-hour is a noisy neighbour (see the module docstring)."""

    factor: Decimal = Decimal(3)
    window_hours: int = 24
    min_points: int = 6
    min_value: int = 10

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NoisyRule:
        env = os.environ if env is None else env

        def number(name: str, default: Any, kind: type, low: Any) -> Any:
            raw = env.get(name)
            if not raw:
                return default
            try:
                value = kind(raw)
            except (ValueError, ArithmeticError):
                value = None
            if value is None or value < low:
                raise ConfigError(f"{name}={raw!r} must be a number >= {low}", setting=name)
            return value

        return cls(factor=number("HOSTMETER_NOISY_FACTOR", Decimal(3), Decimal, Decimal(1)),
                   window_hours=number("HOSTMETER_NOISY_WINDOW_HOURS", 24, int, 1),
                   min_points=number("HOSTMETER_NOISY_MIN_POINTS", 6, int, 1),
                   min_value=number("HOSTMETER_NOISY_MIN_VALUE", 10, int, 0))


class _TenantHour(msgspec.Struct):
    timestamp: str
    tenant: str
    hour: str
    std: int
    micro: int
    metrics: int


class _TenantIngested(msgspec.Struct):
    timestamp: str
    tenant: str
    posts: int


_decode_hour = msgspec.json.Decoder(_TenantHour).decode
_decode_ingested = msgspec.json.Decoder(_TenantIngested).decode
EVENTS = frozenset({"tenant_hour", "tenant_ingested"})


def log_instant(value: Any) -> datetime | None:
    """An instant of a log line (``…Z`` or an offset; naive is UTC), or ``None`` if it is not
    one: a log line's field is data, never a reason to fail."""
    if not isinstance(value, str):
        return None
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)


class TenantEvents:
    """The per-item events of one log pass, written in its transaction (:meth:`finish`)."""

    def __init__(self, conn: Connection, rule: NoisyRule | None = None) -> None:
        self.conn = conn
        self.rule = rule or NoisyRule.from_env()
        self.latest: dict[tuple[str, datetime, str], tuple[int, datetime]] = {}
        self.posts: dict[tuple[datetime, str], int] = {}
        self.touched: set[tuple[datetime, str]] = set()
        self.events = 0
        self.ignored = 0
        self.refreshed = 0
        self.raised: list[dict[str, Any]] = []
        """Flags this pass raised (not already standing): logged once it has committed."""

    def feed(self, event: str, raw: bytes | str) -> None:
        """One line whose ``event`` is in :data:`EVENTS` (a line without the fields is ignored
        and counted, not fatal)."""
        try:
            if event == "tenant_hour":
                item = _decode_hour(raw)
                at, hour = log_instant(item.timestamp), log_instant(item.hour)
                if at is None or hour is None or not item.tenant:
                    raise ValueError
                hour = floor_hour(hour)
                for series, value in (("hosts", item.std + item.micro),
                                      ("metrics", item.metrics)):
                    key = (series, hour, item.tenant[:200])
                    held = self.latest.get(key)
                    if held is None or held[1] <= at:
                        self.latest[key] = (value, at)
            else:
                ingested = _decode_ingested(raw)
                at = log_instant(ingested.timestamp)
                if at is None or not ingested.tenant:
                    raise ValueError
                hour = floor_hour(at)
                pk = (hour, ingested.tenant[:200])
                self.posts[pk] = self.posts.get(pk, 0) + ingested.posts
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            self.ignored += 1
            return
        self.events += 1
        if len(self.latest) + len(self.posts) >= HOLD:
            self._write()
            if len(self.touched) >= REFRESH:
                self._refresh()

    def _write(self) -> None:
        now_rows = [{"series": s, "hour": h, "tenant": t, "value": v, "seen_at": at}
                    for (s, h, t), (v, at) in self.latest.items()]
        post_rows = [{"series": "posts", "hour": h, "tenant": t, "value": v, "seen_at": h}
                     for (h, t), v in self.posts.items()]
        self.touched.update((h, t) for _, h, t in self.latest)
        self.touched.update(self.posts)
        self.latest, self.posts = {}, {}
        # Set-based: the held values go into a scratch table of the transaction in bulk (COPY
        # on PostgreSQL, the driver's executemany on SQLite), then one INSERT … SELECT … ON
        # CONFLICT per kind merges them (latest snapshot wins; posts add up).
        if not now_rows and not post_rows:
            return
        conn = self.conn
        conn.exec_driver_sql(
            "CREATE TEMPORARY TABLE IF NOT EXISTS hm_series_stage (series VARCHAR(16) NOT NULL, "
            "hour TIMESTAMP WITH TIME ZONE NOT NULL, tenant VARCHAR(200) NOT NULL, "
            "value BIGINT NOT NULL, seen_at TIMESTAMP WITH TIME ZONE NOT NULL)"
            if conn.dialect.name == "postgresql" else
            "CREATE TEMPORARY TABLE IF NOT EXISTS hm_series_stage (series TEXT NOT NULL, "
            "hour TEXT NOT NULL, tenant TEXT NOT NULL, value INTEGER NOT NULL, "
            "seen_at TEXT NOT NULL)")
        for rows, merge in ((now_rows, _LATEST), (post_rows, _ADD)):
            if rows:
                conn.exec_driver_sql("DELETE FROM hm_series_stage")
                bulk_insert(conn, _stage, rows)
                conn.exec_driver_sql(merge)

    def finish(self) -> int:
        """Write what is held, then the fleet totals and the flags of the touched hours;
        returns the tenant-hours touched."""
        self._write()
        self._refresh()
        return self.refreshed

    def _refresh(self) -> None:
        if not self.touched:
            return
        hours = sorted({h for h, _ in self.touched})
        self._flags(hours)
        self._fleet(hours)
        self.refreshed += len(self.touched)
        self.touched = set()

    def _fleet(self, hours: list[datetime]) -> None:
        s = tenant_series
        rows: list[dict[str, Any]] = []
        flagged: dict[datetime, int] = {}
        for i in range(0, len(hours), _CHUNK):
            part = hours[i:i + _CHUNK]
            sums = self.conn.execute(
                sa.select(s.c.series, s.c.hour, sa.func.sum(s.c.value))
                .where(s.c.hour.in_(part)).group_by(s.c.series, s.c.hour)).all()
            rows += [{"name": FLEET_METRICS[series], "bucket": hour, "job": "", "status": "",
                      "value": Decimal(int(total))} for series, hour, total in sums
                     if series in FLEET_METRICS]
            f = tenant_flags
            flagged.update({hour: int(n) for hour, n in self.conn.execute(
                sa.select(f.c.hour, sa.func.count(sa.distinct(f.c.tenant)))
                .where(f.c.hour.in_(part)).group_by(f.c.hour))})
        rows += [{"name": NOISY, "bucket": hour, "job": "", "status": "",
                  "value": Decimal(flagged.get(hour, 0))} for hour in hours]
        upsert(self.conn, job_metrics, rows, key=["name", "bucket", "job", "status"],
               update=["value"])

    def _flags(self, hours: list[datetime]) -> None:
        """Flag (or clear) every touched tenant-hour of the flagged series: each one's value
        against the median of the tenant's values in the window before it (read for the
        touched tenants and hours only; a bisect and a median of at most a window of values
        per tenant-hour)."""
        rule = self.rule
        window = timedelta(hours=rule.window_hours)
        tenants = sorted({t for _, t in self.touched})
        lo, hi = hours[0] - window, hours[-1]
        s, f = tenant_series, tenant_flags
        groups: dict[tuple[str, str], tuple[list[datetime], list[int]]] = {}
        existing: set[tuple[str, datetime, str]] = set()
        for i in range(0, len(tenants), _CHUNK):
            part = tenants[i:i + _CHUNK]
            for series, tenant, hour, value in self.conn.execute(
                    sa.select(s.c.series, s.c.tenant, s.c.hour, s.c.value)
                    .where(s.c.series.in_(FLAGGED_SERIES), s.c.tenant.in_(part),
                           s.c.hour >= lo, s.c.hour <= hi)
                    .order_by(s.c.series, s.c.tenant, s.c.hour)):
                times, values = groups.setdefault((series, tenant), ([], []))
                times.append(hour)
                values.append(int(value))
            existing.update((r.series, r.hour, r.tenant) for r in self.conn.execute(
                sa.select(f.c.series, f.c.hour, f.c.tenant)
                .where(f.c.tenant.in_(part), f.c.hour >= hours[0], f.c.hour <= hi)))
        flags: dict[tuple[str, datetime, str], dict[str, Any]] = {}
        for hour, tenant in self.touched:
            for series in FLAGGED_SERIES:
                group = groups.get((series, tenant))
                if group is None:
                    continue
                times, values = group
                at = bisect_left(times, hour)
                if at == len(times) or times[at] != hour:
                    continue
                before = values[bisect_left(times, hour - window):at]
                if len(before) < rule.min_points:
                    continue
                middle = Decimal(str(median(before)))
                value = values[at]
                if middle > 0 and value >= rule.min_value and value >= rule.factor * middle:
                    flags[(series, hour, tenant)] = {"series": series, "hour": hour,
                                                     "tenant": tenant, "value": value,
                                                     "median": middle}
        touched = self.touched
        gone = [k for k in existing if (k[1], k[2]) in touched]
        for series, hour, tenant in gone:  # rare: a flag whose hour was snapshotted again
            self.conn.execute(sa.delete(f).where(f.c.series == series, f.c.hour == hour,
                                                 f.c.tenant == tenant))
        rows = list(flags.values())
        for i in range(0, len(rows), _CHUNK):
            self.conn.execute(sa.insert(f), rows[i:i + _CHUNK])
        self.raised.extend(r for k, r in flags.items() if k not in existing)


_stage = sa.Table(
    "hm_series_stage",
    sa.MetaData(),  # not the schema's: a scratch table of one pass's transaction, never migrated
    sa.Column("series", sa.String(16)),
    sa.Column("hour", tenant_series.c.hour.type),
    sa.Column("tenant", sa.String(200)),
    sa.Column("value", sa.BigInteger),
    sa.Column("seen_at", tenant_series.c.seen_at.type),
)
_MERGE = ("INSERT INTO tenant_series (series, hour, tenant, value, seen_at) "
          "SELECT series, hour, tenant, value, seen_at FROM hm_series_stage WHERE true "
          "ON CONFLICT (series, hour, tenant) DO UPDATE SET ")
_LATEST = (_MERGE + "value = excluded.value, seen_at = excluded.seen_at "
           "WHERE tenant_series.seen_at <= excluded.seen_at")
_ADD = _MERGE + "value = tenant_series.value + excluded.value"


def flagged(conn: Connection, *, since: datetime | None = None) -> list[dict[str, Any]]:
    """Flagged tenant-hours (newest first), optionally only from ``since``."""
    f = tenant_flags
    q = sa.select(f).order_by(f.c.hour.desc(), f.c.series, f.c.tenant)
    if since is not None:
        q = q.where(f.c.hour >= since)
    return [dict(r) for r in conn.execute(q).mappings()]


def top_tenants(conn: Connection, series: str, hour: datetime, limit: int
                ) -> list[tuple[str, int]]:
    """The ``limit`` largest tenants of ``series`` in ``hour``."""
    s = tenant_series
    return [(t, int(v)) for t, v in conn.execute(
        sa.select(s.c.tenant, s.c.value).where(s.c.series == series, s.c.hour == hour)
        .order_by(s.c.value.desc(), s.c.tenant).limit(limit))]


# --- reading, for the dashboard ---------------------------------------------------------------


def latest_hour(conn: Connection, series: str) -> datetime | None:
    """The newest hour of ``series`` (one seek on the primary key, which leads with it)."""
    s = tenant_series
    hour = conn.execute(sa.select(sa.func.max(s.c.hour)).where(s.c.series == series)
                        ).scalar_one()
    return None if hour is None else hour.astimezone(UTC)


def growth(conn: Connection, series: str, hour: datetime, baseline: datetime, limit: int
           ) -> list[tuple[str, int, int | None]]:
    """(tenant, value at ``hour``, value at ``baseline`` or None) of the ``limit`` tenants
    whose ``series`` grew most from ``baseline`` to ``hour`` (a tenant with no value at
    ``baseline`` grew from 0), largest growth first, only those that grew.

    Reads the two hours only (two ranges of the primary key), whatever the history.
    """
    cur, prev = tenant_series.alias("cur"), tenant_series.alias("prev")
    delta = cur.c.value - sa.func.coalesce(prev.c.value, 0)
    return [(t, int(v), None if p is None else int(p)) for t, v, p in conn.execute(
        sa.select(cur.c.tenant, cur.c.value, prev.c.value)
        .outerjoin(prev, sa.and_(prev.c.series == cur.c.series, prev.c.hour == baseline,
                                 prev.c.tenant == cur.c.tenant))
        .where(cur.c.series == series, cur.c.hour == hour, delta > 0)
        .order_by(delta.desc(), cur.c.tenant).limit(limit))]


def recent_flags(conn: Connection, *, since: datetime, limit: int
                 ) -> tuple[list[dict[str, Any]], int]:
    """The ``limit`` newest flagged tenant-hours from ``since`` on (within an hour, the
    largest value / median first) and how many there are from ``since`` on; both read the
    ``hour`` index from ``since``, not the whole history."""
    f = tenant_flags
    recent = f.c.hour >= since
    rows = [dict(r) for r in conn.execute(
        sa.select(f).where(recent)
        .order_by(f.c.hour.desc(),
                  (sa.cast(f.c.value, sa.Float) / sa.cast(f.c.median, sa.Float)).desc(),
                  f.c.series, f.c.tenant)
        .limit(limit)).mappings()]
    total = int(conn.execute(sa.select(sa.func.count()).select_from(f).where(recent))
                .scalar_one())
    return rows, total


def log_raised(raised: list[dict[str, Any]]) -> None:
    """One ``noisy_neighbour`` warning per flag a committed pass raised (a flag that already
    stood, or a pass that rolled back, logs nothing): tenant, series, hour, value, median and
    their ratio."""
    import structlog

    log = structlog.get_logger("hostmeter.metrics")
    for r in raised:
        log.warning("noisy_neighbour", tenant=r["tenant"], series=r["series"],
                    hour=r["hour"].isoformat().replace("+00:00", "Z"), value=r["value"],
                    median=str(r["median"]), ratio=str(round(r["value"] / r["median"], 2)))
