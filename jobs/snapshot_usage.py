"""``snapshot-usage``: freeze each hour's recorded usage into ``usage_snapshots``.

Window: the scheduled time ``T`` → the full hour before ``T`` plus ``lookback`` earlier hours
(default 3) to absorb late posts. ``T = 10:05`` snapshots 06:00, 07:00, 08:00 and 09:00 (UTC).
A backfill passes the hours explicitly. Each hour is its own transaction.

First, on PostgreSQL, the monthly partitions of the month of ``T``, the months after it
(:data:`~metering.partitions.MONTHS_AHEAD`) and the months of the hours snapshotted are made
sure of (:func:`~metering.partitions.ensure_months`, its own short transaction). A role that
may not create them, or a table lock not granted within seconds, does not fail the run: rows of
a month without its partition go to the DEFAULT partition, and the next run tries again.

With the post-time hot path (``HOSTMETER_REDIS_URL``), what Redis holds of the window's hours is
flushed into the database first, so an hour is never frozen while Redis holds posts of it that
the database has not seen; if Redis does not answer, the run fails before freezing anything.

Per-item events: one ``tenant_hour`` (info) per row the run froze, read back in the hour's
transaction (:func:`~metering.snapshot.tenant_hours`) and logged once it has committed, fields
``tenant`` (its key), ``hour`` (``2026-10-15T10:00:00Z``), ``std`` and ``micro`` (active
standard and micro hosts), ``metrics`` (host metrics), ``over`` (standard + micro metric
overage), ``svc`` (service metrics), ``mon`` (monitors) and ``plan`` (or null). Re-running an
hour freezes it again and logs its lines again: the latest line of a (tenant, hour) is its
frozen usage (the hourly look-back logs each tenant-hour up to ``lookback + 1`` times). A
chunk's rows are held from that read to the commit, some 165 bytes each (8 MB for 2,000
tenants × 24 hours); a line is some 350 bytes.

Completeness counts, in tenant-hours (a tenant in two hours counts twice): ``tenants_expected``
is the (tenant, hour) pairs of the snapshotted hours that should have a row, counted from
recorded usage by a statement of its own (:func:`~metering.snapshot.expected_tenant_hours`,
before the snapshot, in its transaction: a post that lands meanwhile can only make the run
process more than expected, never look like a miss); ``tenants_processed`` is the rows the
snapshot wrote, one per ``tenant_hour`` line. Hours kept because their raw usage is pruned are
in neither. ``tenants_processed < tenants_expected`` means the snapshot lost tenant-hours.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from billing.catalog import catalog_for
from billing.service import limits_for
from jobs.runtime.context import JobContext
from jobs.runtime.logconfig import item_events
from metering.flush import flush_configured
from metering.partitions import (
    JOB_LOCK_TIMEOUT,
    PARTITIONED,
    ensure_months,
    missing_months,
    months_ahead,
)
from metering.retention import frozen_hours
from metering.snapshot import (
    DEFAULT_LOOKBACK,
    MetricLimits,
    TenantHour,
    expected_tenant_hours,
    snapshot_hours,
    tenant_hours,
)
from metering.timeutil import HOUR, floor_hour, hours_between, period_of

__all__ = ["DEFAULT_LOOKBACK", "backfill_hours", "run", "window"]

CHUNK_HOURS = 24


def window(logical_time: datetime, lookback: int = DEFAULT_LOOKBACK) -> list[datetime]:
    """The hours the hourly trigger at ``logical_time`` snapshots, oldest first."""
    if lookback < 0:
        raise ValueError("lookback must be >= 0")
    last = floor_hour(logical_time) - HOUR
    return [last - i * HOUR for i in range(lookback, -1, -1)]


def backfill_hours(start: datetime, end: datetime) -> list[datetime]:
    """Every hour in ``[start, end)``."""
    return list(hours_between(start, end))


def _limits(hour: datetime, zone: ZoneInfo) -> MetricLimits:
    """The per-host metric limits of the catalog in force for the month containing ``hour``."""
    return limits_for(catalog_for(period_of(hour, zone)))


def _ensure_partitions(ctx: JobContext, logical_time: datetime,
                       hours: Sequence[datetime]) -> None:
    """Create the monthly partitions ahead of need (PostgreSQL; see the module docstring).

    Giving up is a warning only when a month the run writes now has no partition (its rows go
    to the DEFAULT partition until the owner runs ``hostmeter db upgrade``); months ahead can
    wait for a later run.
    """
    log = structlog.get_logger("hostmeter.snapshot")
    now = [logical_time, *hours]
    # One table per transaction: the job never holds two tables' ACCESS EXCLUSIVE locks at once.
    for table in PARTITIONED:
        with ctx.engine.begin() as conn:
            result = ensure_months(conn, [*months_ahead(logical_time), *now], tables=(table,),
                                   lock_timeout=JOB_LOCK_TIMEOUT)
            waiting = (missing_months(conn, now, tables=(table,))
                       if result.skipped is not None else {})
        if result.created:
            log.debug("partitions_created", partitions=[p.name for p in result.created],
                      moved_rows=result.moved_rows)
        if waiting:
            log.warning("partitions_not_created", table=table, reason=result.skipped,
                        months=[m.strftime("%Y-%m") for m in waiting[table]])
        elif result.skipped is not None:
            log.debug("partitions_not_created", table=table, reason=result.skipped)


def _flush_first(ctx: JobContext, hours: Sequence[datetime]) -> int | None:
    """With a hot path (``HOSTMETER_REDIS_URL``), move what Redis holds of ``hours`` into the
    database before they are frozen; the tenant-hours flushed (``None``: no hot path).

    Redis not answering fails the run before any hour is frozen (an hour frozen without the
    posts Redis holds would bill too little); the next hourly run covers these hours again
    through its look-back, and the run ledger shows the failed one. Nothing is deleted from
    Redis here: that is ``flush-usage``'s, after the look-back.
    """
    if not hours:
        return None
    summary = flush_configured(ctx.engine, ctx.settings, release_before=None, hours=hours)
    if summary is None:
        return None
    log = structlog.get_logger("hostmeter.snapshot")
    for problem in summary.problems:
        log.warning("hot_path_value_skipped", problem=problem)
    log.debug("hot_path_flushed", **summary.as_dict())
    return summary.tenant_hours


def _log_tenant_hours(rows: Sequence[TenantHour]) -> None:
    """One ``tenant_hour`` event per row (see the module docstring), on the logger's fast path."""
    hours: dict[datetime, str] = {}
    with item_events("tenant_hour") as emit:
        for r in rows:
            hour = hours.get(r.hour)
            if hour is None:
                hour = hours[r.hour] = r.hour.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            emit(tenant=r.tenant, hour=hour, std=r.standard_hosts, micro=r.micro_hosts,
                 metrics=r.host_metrics, over=r.overage, svc=r.service_metrics,
                 mon=r.monitors, plan=r.plan)


def run(
    ctx: JobContext,
    logical_time: datetime,
    *,
    lookback: int = DEFAULT_LOOKBACK,
    hours: Sequence[datetime] | None = None,
    limits: MetricLimits | None = None,
) -> dict[str, Any]:
    """Snapshot ``hours`` (default: the window of ``logical_time``); returns the run's counts.

    Hours are written in chunks of up to :data:`CHUNK_HOURS` (one transaction each), grouped so
    that a chunk never spans two billing months (each month's catalog gives the metric limits,
    unless ``limits`` is passed).
    """
    log = structlog.get_logger("hostmeter.snapshot")
    todo = sorted(hours) if hours is not None else window(logical_time, lookback)
    zone = ctx.settings.zone
    rows_written = hosts = metrics = roles = 0
    expected = processed = 0
    done = 0
    chunks: list[list[datetime]] = []
    for hour in todo:
        if (chunks and len(chunks[-1]) < CHUNK_HOURS
                and period_of(chunks[-1][0], zone) == period_of(hour, zone)):
            chunks[-1].append(hour)
        else:
            chunks.append([hour])
    _ensure_partitions(ctx, logical_time, todo)
    flushed = _flush_first(ctx, todo)
    pruned = 0
    for chunk in chunks:
        with ctx.engine.begin() as conn:
            frozen = frozen_hours(conn, chunk)  # raw usage pruned: keep the snapshot
            pruned += len(frozen)
            todo_now = [h for h in chunk if h not in frozen]
            expected += expected_tenant_hours(conn, todo_now)
            results = snapshot_hours(
                conn, todo_now, limits=limits or _limits(chunk[0], zone), run_id=ctx.run_id,
                snapshotted_at=ctx.clock(),
            )
            written = tenant_hours(conn, todo_now)
        processed += len(written)
        _log_tenant_hours(written)
        del written
        for result in results:
            rows_written += result.tenants
            hosts += result.standard_hosts + result.micro_hosts
            metrics += result.host_metrics
            roles += result.roles
            log.debug(
                "hour_snapshotted",
                hour=result.hour.isoformat(),
                tenants=result.tenants,
                standard_hosts=result.standard_hosts,
                micro_hosts=result.micro_hosts,
            )
        done += len(chunk)
        if ctx.progress is not None:
            ctx.progress(done, len(todo))
    return {
        "hours": len(todo),
        "first_hour": todo[0].isoformat() if todo else None,
        "last_hour": todo[-1].isoformat() if todo else None,
        "tenants_expected": expected,
        "tenants_processed": processed,
        "tenant_hours": rows_written,
        "host_hours": hosts,
        "host_metrics": metrics,
        "role_rows": roles,
        "kept_pruned_hours": pruned,
        **({} if flushed is None else {"flushed_tenant_hours": flushed}),
    }
