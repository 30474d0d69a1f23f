"""``prune-usage``: delete recorded usage past retention (daily).

Window: the scheduled time ``T`` → the cut-off, the start of the billing month that contains
``T − retention`` (``HOSTMETER_RETENTION_DAYS``, default 400 days: a year plus time for late
corrections). Whole months only, and only hours already snapshotted (see
:mod:`metering.retention`), so every pruned hour stays billable from its snapshot. On
PostgreSQL whole UTC-month partitions are dropped where they can be, the rest deleted by rows.

The hourly estimates (``usage_estimates``) are thinned in the same run: before the start of the
previous billing month, only each tenant's last estimate of a month is kept
(:func:`billing.estimate.thin`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import structlog

from billing.estimate import thin
from jobs.runtime.context import JobContext
from metering.partitions import JOB_LOCK_TIMEOUT
from metering.retention import prune
from metering.timeutil import month_bounds, period_of, previous_period

__all__ = ["cutoff", "run"]


def cutoff(logical_time: datetime, retention_days: int, zone: Any) -> datetime:
    """The start of the billing month that contains ``logical_time − retention_days``."""
    return month_bounds(period_of(logical_time - timedelta(days=retention_days), zone), zone)[0]


def run(ctx: JobContext, logical_time: datetime) -> dict[str, Any]:
    limit = cutoff(logical_time, ctx.settings.retention_days, ctx.settings.zone)
    with ctx.engine.begin() as conn:
        result = prune(conn, limit, now=ctx.clock(), lock_timeout=JOB_LOCK_TIMEOUT)
    zone = ctx.settings.zone
    history_before = month_bounds(previous_period(logical_time, zone), zone)[0]
    with ctx.engine.begin() as conn:
        thinned = thin(conn, before=history_before)
    structlog.get_logger("hostmeter.prune").info(
        "usage_pruned", cutoff=limit.isoformat(), host_hours=result.host_hours,
        service_hours=result.service_hours, partitions_dropped=result.partitions_dropped,
        partitions_skipped=result.partitions_skipped,  # why whole months went row by row
        estimates_thinned=thinned, estimates_hourly_from=history_before.isoformat())
    return {"cutoff": limit.isoformat(), "retention_days": ctx.settings.retention_days,
            "host_hours_deleted": result.host_hours,
            "service_hours_deleted": result.service_hours,
            "partitions_dropped": result.partitions_dropped,
            "estimates_thinned": thinned}
