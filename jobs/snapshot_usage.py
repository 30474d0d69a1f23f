"""``snapshot-usage``: freeze each hour's recorded usage into ``usage_snapshots``.

Window: the scheduled time ``T`` → the full hour before ``T`` plus ``lookback`` earlier hours
(default 3) to absorb late posts. ``T = 10:05`` snapshots 06:00, 07:00, 08:00 and 09:00 (UTC).
A backfill passes the hours explicitly. Each hour is its own transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from billing.catalog import catalog_for
from billing.service import limits_for
from jobs.runtime.context import JobContext
from metering.retention import frozen_hours
from metering.snapshot import DEFAULT_LOOKBACK, MetricLimits, snapshot_hours
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
    tenant_hours = hosts = metrics = roles = 0
    tenants_max = 0
    done = 0
    chunks: list[list[datetime]] = []
    for hour in todo:
        if (chunks and len(chunks[-1]) < CHUNK_HOURS
                and period_of(chunks[-1][0], zone) == period_of(hour, zone)):
            chunks[-1].append(hour)
        else:
            chunks.append([hour])
    pruned = 0
    for chunk in chunks:
        with ctx.engine.begin() as conn:
            frozen = frozen_hours(conn, chunk)  # raw usage pruned: keep the snapshot
            pruned += len(frozen)
            todo_now = [h for h in chunk if h not in frozen]
            results = snapshot_hours(
                conn, todo_now, limits=limits or _limits(chunk[0], zone), run_id=ctx.run_id,
                snapshotted_at=ctx.clock(),
            )
        for result in results:
            tenant_hours += result.tenants
            tenants_max = max(tenants_max, result.tenants)
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
        "tenants_expected": tenants_max,
        "tenants_processed": tenants_max,
        "tenant_hours": tenant_hours,
        "host_hours": hosts,
        "host_metrics": metrics,
        "role_rows": roles,
        "kept_pruned_hours": pruned,
    }
