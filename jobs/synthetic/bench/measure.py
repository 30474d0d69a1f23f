"""The timed measurements, each beside its floor where it has one: ingest through the
metric-post API, a month of snapshots beside one plain aggregate over the same ``host_hours``
written into a temporary table (:func:`snapshot_floor_sql`), and the month's close beside the
plain statements over the same ``usage_snapshots`` (:func:`close_floor_sql`). Each floor's SQL is
printed with its figures."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billing.catalog import catalog_for
from billing.service import BillingRequest, close_period, limits_for
from jobs import snapshot_usage
from jobs.runtime.context import JobContext, new_run_id, run_job
from jobs.synthetic.bench.tiers import SNAPSHOT_RUN_PREFIX, BenchTier, Progress, no_progress
from metering.db import UTCDateTime
from metering.ingest import UsageRecorder
from metering.records import HostPost, Record
from metering.settings import Settings
from metering.snapshot import MetricLimits
from metering.timeutil import HOUR, month_bounds, period_of

__all__ = ["CloseTiming", "IngestTiming", "SnapshotTiming", "close_floor_sql", "floor_statement",
           "ingest_posts", "snapshot_floor_sql", "time_close", "time_ingest", "time_snapshots"]


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestTiming:
    """Throughput of one ingest sample."""

    posts: int
    observations: int
    calls: int
    seconds: float
    rows_written: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "posts": self.posts,
            "observations": self.observations,
            "calls": self.calls,
            "posts_per_call": self.posts // self.calls if self.calls else 0,
            "seconds": round(self.seconds, 3),
            "posts_per_s": round(self.posts / self.seconds, 1) if self.seconds else None,
            "observations_per_s": (
                round(self.observations / self.seconds, 1) if self.seconds else None
            ),
            "rows_written": self.rows_written,
        }


def _names(count: int, host: int) -> tuple[str, ...]:
    base = ("loadavg1", "loadavg5", "loadavg15", "cpu.user.percentage", "cpu.system.percentage",
            "memory.used", "memory.free", "disk.sda.reads.delta", "disk.sda.writes.delta",
            "interface.eth0.rxBytes.delta", "interface.eth0.txBytes.delta")
    return base + tuple(f"custom.app{host % 7}.metric{i:04d}" for i in range(count - len(base)))


def ingest_posts(tier: BenchTier, start: datetime, hours: int) -> list[HostPost]:
    """The batched ingest sample, in arrival order (by minute, then host).

    Each host posts ``metrics_per_post`` names a minute: 90 % the same every time, the rest
    rotating through a larger pool, so some posts add bits to the hour's bitmap and most
    merge into it without change, as on a live service.
    """
    steady = tier.metrics_per_post * 9 // 10
    rotating = tier.metrics_per_post - steady
    posts: list[HostPost] = []
    stride = max(1, hours // tier.ingest_hours)
    hosts = [
        (f"bench-ingest-{i}", f"bench-ingest-h-{j}", "micro" if j % 4 == 3 else "standard",
         _names(steady + 4 * rotating, j))
        for i in range(1, tier.ingest_tenants + 1)
        for j in range(1, tier.ingest_hosts_per_tenant + 1)
    ]
    for k in range(tier.ingest_hours):
        hour = start + ((k * stride + stride // 2) % hours) * HOUR
        for p in range(tier.ingest_posts_per_host_hour):
            at = hour + timedelta(minutes=p % 60, seconds=7)
            for tenant, host, kind, pool in hosts:
                r = steady + (p * rotating) % (3 * rotating)
                metrics = pool[:steady] + pool[r : r + rotating]
                posts.append(HostPost(tenant=tenant, host=host, kind=kind, at=at,
                                      metrics=metrics))
    return posts


def _timed_record(recorder: UsageRecorder, calls: list[list[Record]],
                  update: Callable[..., None]) -> IngestTiming:
    written = 0
    started = time.perf_counter()
    for i, call in enumerate(calls, start=1):
        written += recorder.record(call).written_rows
        update(i)
    seconds = time.perf_counter() - started
    posts = sum(len(c) for c in calls)
    observations = sum(len(r.metrics) for c in calls for r in c if isinstance(r, HostPost))
    return IngestTiming(posts=posts, observations=observations, calls=len(calls),
                        seconds=seconds, rows_written=written)


def time_ingest(
    engine: Engine, tier: BenchTier, start: datetime, hours: int, *,
    progress_factory: Progress = no_progress,
) -> tuple[IngestTiming, IngestTiming]:
    """Push the batched sample, then lone posts; returns (batched, single) timings."""
    posts = ingest_posts(tier, start, hours)
    batched: list[list[Record]] = [
        list(posts[i : i + tier.posts_per_call])
        for i in range(0, len(posts), tier.posts_per_call)
    ]
    # Lone posts: the same hosts a little later in the same hours (merging into existing rows
    # or opening new minutes), one transaction each.
    step = max(1, len(posts) // max(1, tier.single_posts))
    single: list[list[Record]] = [
        [HostPost(tenant=p.tenant, host=p.host, kind=p.kind, at=p.at + timedelta(seconds=30),
                  metrics=p.metrics)]
        for p in posts[::step][: tier.single_posts]
    ]
    recorder = UsageRecorder(engine)
    with progress_factory("ingest", len(batched)) as update:
        batch_timing = _timed_record(recorder, batched, update)
    with progress_factory("ingest (one post per call)", len(single)) as update:
        single_timing = _timed_record(recorder, single, update)
    return batch_timing, single_timing


# --- snapshot and floor ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotTiming:
    """A month of snapshots beside its floor (see :func:`snapshot_floor_sql`)."""

    run_id: str
    status: str
    error: str | None
    hours: int
    snapshot_s: float
    floor_s: float
    floor_read_s: float
    floor_rows: int
    floor_sql: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "error": self.error,
            "hours": self.hours,
            "snapshot_s": round(self.snapshot_s, 3),
            "per_hour_mean_s": round(self.snapshot_s / self.hours, 4) if self.hours else None,
            "floor_s": round(self.floor_s, 3),
            "ratio": round(self.snapshot_s / self.floor_s, 2) if self.floor_s else None,
            "floor_read_s": round(self.floor_read_s, 3),
            "ratio_to_read": (round(self.snapshot_s / self.floor_read_s, 2)
                              if self.floor_read_s else None),
            "floor_rows": self.floor_rows,
            "floor": "one aggregate over the month's host_hours computing each (tenant, hour)'s "
                     "standard and micro hosts, their metric overage and metric total, written "
                     "as one INSERT … SELECT into a temporary table (one row per tenant-hour "
                     "with hosts); floor_read_s is the same aggregate read to one row",
            "floor_sql": self.floor_sql,
        }


_SNAPSHOT_FLOOR_TABLE = "snapshot_floor_rows"


def _snapshot_floor_select(limits: MetricLimits) -> str:
    s, u = int(limits.standard), int(limits.micro)
    return f"""
SELECT tenant_id, hour,
       SUM(CASE WHEN kind = 'standard' THEN 1 ELSE 0 END) AS standard_hosts,
       SUM(CASE WHEN kind = 'micro' THEN 1 ELSE 0 END) AS micro_hosts,
       SUM(CASE WHEN kind = 'standard' AND metric_count > {s} THEN metric_count - {s} ELSE 0 END)
         AS standard_overage,
       SUM(CASE WHEN kind = 'micro' AND metric_count > {u} THEN metric_count - {u} ELSE 0 END)
         AS micro_overage,
       SUM(metric_count) AS host_metrics
FROM host_hours
WHERE hour >= :start AND hour < :end
GROUP BY tenant_id, hour"""


def snapshot_floor_sql(limits: MetricLimits) -> list[str]:
    """The snapshot's floor, statement by statement (parameters ``:start`` and ``:end``).

    Snapshotting a month must read every recorded host-hour of it once, compute per (tenant,
    hour) the active standard and micro hosts, their summed metric overage and their metric
    total, and write a row per tenant-hour. The floor does exactly that with one aggregate
    written by one ``INSERT … SELECT`` into a temporary table (no index, no key, no trigger).
    It leaves out what a snapshot does besides: plans, service metrics, monitors, roles, the
    rows of tenant-hours without hosts, and replacing the hours' previous rows.
    """
    return [
        f"CREATE TEMPORARY TABLE {_SNAPSHOT_FLOOR_TABLE} (tenant_id INTEGER, "
        "hour TIMESTAMP, standard_hosts BIGINT, micro_hosts BIGINT, standard_overage BIGINT, "
        "micro_overage BIGINT, host_metrics BIGINT)",
        f"INSERT INTO {_SNAPSHOT_FLOOR_TABLE} {_snapshot_floor_select(limits).strip()}",
    ]


def floor_statement(start: datetime, end: datetime, limits: MetricLimits | None = None
                    ) -> sa.TextClause:
    """The floor's aggregate as one plain statement read down to a single row (the read-only
    floor): the same ``host_hours`` rows and the same per-(tenant, hour) numbers."""
    inner = _snapshot_floor_select(limits or MetricLimits()).strip()
    sql = f"SELECT COUNT(*), SUM(host_metrics) FROM ({inner}) per_tenant_hour"
    return _bound(sql).bindparams(start=start, end=end)


def _bound(sql: str) -> sa.TextClause:
    return sa.text(sql).bindparams(sa.bindparam("start", type_=UTCDateTime),
                                   sa.bindparam("end", type_=UTCDateTime))


def time_snapshots(
    engine: Engine, settings: Settings, hour_list: list[datetime], *,
    progress_factory: Progress = no_progress,
) -> SnapshotTiming:
    run_id = f"{SNAPSHOT_RUN_PREFIX}{new_run_id()}"
    with progress_factory("snapshot", len(hour_list)) as update:
        ctx = JobContext(engine=engine, settings=settings, run_id=run_id, trigger="bench",
                         progress=update)
        started = time.perf_counter()
        result = run_job("snapshot-usage", snapshot_usage.run, ctx, hour_list[0],
                         hours=hour_list)
        snapshot_s = time.perf_counter() - started
    limits = limits_for(catalog_for(period_of(hour_list[0], settings.zone)))
    start, end = hour_list[0], hour_list[-1] + HOUR
    create, insert = snapshot_floor_sql(limits)
    with engine.connect() as conn:
        started = time.perf_counter()
        conn.execute(sa.text(create))
        rows = conn.execute(_bound(insert), {"start": start, "end": end}).rowcount
        floor_s = time.perf_counter() - started
        conn.rollback()  # the temporary table goes with the transaction
        started = time.perf_counter()
        conn.execute(floor_statement(start, end, limits)).one()
        read_s = time.perf_counter() - started
        conn.rollback()
    return SnapshotTiming(
        run_id=run_id, status=result.status, error=result.error, hours=len(hour_list),
        snapshot_s=snapshot_s, floor_s=floor_s, floor_read_s=read_s, floor_rows=int(rows),
        floor_sql=[_one_line(q) for q in snapshot_floor_sql(limits)],
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseTiming:
    """The month's close (every tenant rated, draft invoices written) beside its floor (see
    :func:`close_floor_sql`): the plain statements that read the same month of snapshots,
    compute the same per-tenant numbers, and write one row per invoice."""

    status: str
    tenants: int
    invoices_written: int
    rebuilt_hours: int
    close_s: float
    floor_s: float
    floor_read_s: float
    floor_rows: int
    floor_sql: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "tenants": self.tenants,
            "invoices_written": self.invoices_written,
            "rebuilt_hours": self.rebuilt_hours,
            "close_s": round(self.close_s, 3),
            "floor_s": round(self.floor_s, 3),
            "ratio": round(self.close_s / self.floor_s, 2) if self.floor_s else None,
            "floor_read_s": round(self.floor_read_s, 3),
            "ratio_to_read": (round(self.close_s / self.floor_read_s, 2)
                              if self.floor_read_s else None),
            "floor_rows": self.floor_rows,
            "floor": "the reads the close needs (sums per tenant and plan: paid hours and "
                     "free-plan peak; paid-hour sums per tenant and role) with the per-tenant "
                     "read written as one INSERT … SELECT (a row per tenant and plan) into a "
                     "temporary table; floor_read_s is the same statements as plain SELECTs",
            "floor_sql": self.floor_sql,
        }


_CLOSE_FLOOR_TABLE = "close_floor_rows"

_CLOSE_FLOOR_SUMS = """
SELECT tenant_id, plan, COUNT(*) AS hours, SUM(standard_hosts) AS standard_hosts,
       SUM(micro_hosts) AS micro_hosts, SUM(standard_overage) AS standard_overage,
       SUM(micro_overage) AS micro_overage, SUM(service_metrics) AS service_metrics,
       SUM(monitors) AS monitors, MAX(standard_hosts + micro_hosts) AS max_hosts
FROM usage_snapshots
WHERE hour >= :start AND hour < :end
GROUP BY tenant_id, plan"""

_CLOSE_FLOOR_ROLES = """
SELECT r.tenant_id, r.role, SUM(r.hosts) AS hosts
FROM usage_snapshot_roles r
JOIN usage_snapshots s ON s.tenant_id = r.tenant_id AND s.hour = r.hour
WHERE r.hour >= :start AND r.hour < :end AND s.plan = 'standard'
GROUP BY r.tenant_id, r.role"""


def close_floor_sql() -> list[str]:
    """The close's floor, statement by statement (parameters ``:start`` and ``:end``).

    A close must read every snapshot of the month once and sum, per tenant, the paid hours and
    each quantity over them (and the most hosts in a free hour), sum the anomaly-detection
    roles per tenant and role, and write its invoices. The floor does that reading with the
    cheapest plain aggregate we know (plain sums per tenant and plan: the ``standard`` row is
    the paid hours, the ``free`` row has the free-plan peak), written by one ``INSERT …
    SELECT`` into a temporary table (one row per tenant and plan: at least one per invoice; no
    index, no trigger, no lines, no rating), then reads the role sums — less than any close can
    do.
    """
    return [
        f"CREATE TEMPORARY TABLE {_CLOSE_FLOOR_TABLE} (tenant_id INTEGER, plan VARCHAR(16), "
        "hours BIGINT, standard_hosts BIGINT, micro_hosts BIGINT, standard_overage BIGINT, "
        "micro_overage BIGINT, service_metrics BIGINT, monitors BIGINT, max_hosts BIGINT)",
        f"INSERT INTO {_CLOSE_FLOOR_TABLE} {_CLOSE_FLOOR_SUMS.strip()}",
        _CLOSE_FLOOR_ROLES.strip(),
    ]


def _one_line(sql: str) -> str:
    return " ".join(sql.split())


def _time_close_floor(engine: Engine, start: datetime, end: datetime) -> tuple[float, float, int]:
    """(floor seconds, read-only floor seconds, rows the floor wrote); nothing is kept."""
    params = {"start": start, "end": end}
    create, insert, roles = (_bound(q) if ":start" in q else sa.text(q)
                             for q in close_floor_sql())
    with engine.connect() as conn:
        started = time.perf_counter()
        conn.execute(create)
        rows = conn.execute(insert.execution_options(preserve_rowcount=True), params).rowcount
        conn.execute(roles, params).all()
        floor_s = time.perf_counter() - started
        conn.rollback()  # the temporary table goes with the transaction
        started = time.perf_counter()
        conn.execute(_bound(_CLOSE_FLOOR_SUMS), params).all()
        conn.execute(roles, params).all()
        read_s = time.perf_counter() - started
        conn.rollback()
    return floor_s, read_s, int(rows)


def time_close(engine: Engine, settings: Settings, period: str) -> CloseTiming:
    start, end = month_bounds(period, settings.zone)
    req = BillingRequest(period=period, zone=settings.zone, logical_time=end, actor="bench",
                         run_id=f"{SNAPSHOT_RUN_PREFIX}{new_run_id()}", now=end)
    started = time.perf_counter()
    outcome = close_period(engine, req)
    close_s = time.perf_counter() - started
    floor_s, read_s, rows = _time_close_floor(engine, start, end)
    return CloseTiming(status=outcome.status, tenants=len(outcome.tenants),
                       invoices_written=outcome.counts()["invoices_written"],
                       rebuilt_hours=outcome.rebuilt_hours, close_s=close_s, floor_s=floor_s,
                       floor_read_s=read_s, floor_rows=rows,
                       floor_sql=[_one_line(q) for q in close_floor_sql()])
