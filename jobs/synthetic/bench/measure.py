"""The timed measurements, each beside its floor where it has one: ingest through the
metric-post API, a month of snapshots beside one plain aggregate over the same ``host_hours``,
and the month's close beside one plain aggregate over the same ``usage_snapshots``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billing.service import BillingRequest, close_period
from jobs import snapshot_usage
from jobs.runtime.context import JobContext, new_run_id, run_job
from jobs.synthetic.bench.tiers import SNAPSHOT_RUN_PREFIX, BenchTier, Progress, no_progress
from metering import models as m
from metering.ingest import UsageRecorder
from metering.records import HostPost, Record
from metering.settings import Settings
from metering.timeutil import HOUR, month_bounds

__all__ = ["CloseTiming", "IngestTiming", "SnapshotTiming", "close_floor_statement",
           "floor_statement", "ingest_posts", "time_close", "time_ingest", "time_snapshots"]


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
    """A month of snapshots beside the floor statement."""

    run_id: str
    status: str
    error: str | None
    hours: int
    snapshot_s: float
    floor_s: float
    floor_rows: int
    floor_sql: str

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
            "floor_rows": self.floor_rows,
            "floor_sql": self.floor_sql,
        }


def floor_statement(start: datetime, end: datetime) -> sa.Select[Any]:
    """One plain aggregate over the same ``host_hours`` rows the snapshots read."""
    hh = m.host_hours
    return (
        sa.select(hh.c.tenant_id, hh.c.hour, sa.func.count(), sa.func.sum(hh.c.metric_count))
        .where(hh.c.hour >= start, hh.c.hour < end)
        .group_by(hh.c.tenant_id, hh.c.hour)
    )


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
    stmt = floor_statement(hour_list[0], hour_list[-1] + HOUR)
    with engine.connect() as conn:
        started = time.perf_counter()
        rows = conn.execute(stmt).all()
        floor_s = time.perf_counter() - started
        conn.rollback()
    sql = " ".join(str(stmt.compile(dialect=engine.dialect)).split())
    return SnapshotTiming(
        run_id=run_id, status=result.status, error=result.error, hours=len(hour_list),
        snapshot_s=snapshot_s, floor_s=floor_s, floor_rows=len(rows), floor_sql=sql,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseTiming:
    """The month's close (every tenant rated, draft invoices written) beside its floor: one plain
    aggregate statement over the same month of snapshots."""

    status: str
    tenants: int
    invoices_written: int
    rebuilt_hours: int
    close_s: float
    floor_s: float
    floor_rows: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "tenants": self.tenants,
            "invoices_written": self.invoices_written,
            "rebuilt_hours": self.rebuilt_hours,
            "close_s": round(self.close_s, 3),
            "floor_s": round(self.floor_s, 3),
            "ratio": round(self.close_s / self.floor_s, 2) if self.floor_s else None,
            "floor_rows": self.floor_rows,
        }


def close_floor_statement(start: datetime, end: datetime) -> sa.Select[Any]:
    """What any close must at least do: read the month's snapshots once, summed per tenant."""
    us = m.usage_snapshots
    return (
        sa.select(us.c.tenant_id, sa.func.count(), sa.func.sum(us.c.standard_hosts),
                  sa.func.sum(us.c.micro_hosts), sa.func.sum(us.c.standard_overage),
                  sa.func.sum(us.c.micro_overage), sa.func.sum(us.c.service_metrics),
                  sa.func.sum(us.c.monitors))
        .where(us.c.hour >= start, us.c.hour < end)
        .group_by(us.c.tenant_id)
    )


def time_close(engine: Engine, settings: Settings, period: str) -> CloseTiming:
    start, end = month_bounds(period, settings.zone)
    req = BillingRequest(period=period, zone=settings.zone, logical_time=end, actor="bench",
                         run_id=f"{SNAPSHOT_RUN_PREFIX}{new_run_id()}", now=end)
    started = time.perf_counter()
    outcome = close_period(engine, req)
    close_s = time.perf_counter() - started
    with engine.connect() as conn:
        started = time.perf_counter()
        rows = conn.execute(close_floor_statement(start, end)).all()
        floor_s = time.perf_counter() - started
        conn.rollback()
    return CloseTiming(status=outcome.status, tenants=len(outcome.tenants),
                       invoices_written=outcome.counts()["invoices_written"],
                       rebuilt_hours=outcome.rebuilt_hours, close_s=close_s, floor_s=floor_s,
                       floor_rows=len(rows))


