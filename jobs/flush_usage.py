"""``flush-usage``: move the hours the post-time hot path holds in Redis into the database.

Every 5 minutes. The scheduled time ``T`` → every tenant-hour Redis holds (closed hours and the
current hour as far as it has gone) is merged into ``host_hours`` / ``service_hours`` with
ingest's bit-OR merge (:mod:`metering.flush`); the tenant-hours older than the snapshot's
look-back (before ``floor_hour(T) − (look-back + 1) hours``: every hourly snapshot that could
read them has run) are then deleted from Redis, each only if no post reached it since it was
read. Without ``HOSTMETER_REDIS_URL`` there is no hot path and the run does nothing.

A run killed anywhere is repaired by the next one: merging is a bit-OR, and nothing leaves Redis
before the database has committed it.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

import structlog

from jobs.runtime.context import JobContext
from metering.flush import FLUSH_TIMEOUT, flush_usage
from metering.hotpath import connect_settings
from metering.snapshot import DEFAULT_LOOKBACK
from metering.timeutil import HOUR, floor_hour

__all__ = ["FLUSH_TIMEOUT", "flush_hot_path", "release_before", "run"]

def release_before(logical_time: datetime, lookback: int = DEFAULT_LOOKBACK) -> datetime:
    """Tenant-hours before this instant may leave Redis once they are in the database: the last
    hourly snapshot that looks at them (``lookback`` hours later) has run."""
    return floor_hour(logical_time) - (lookback + 1) * HOUR


def flush_hot_path(ctx: JobContext, *, release: datetime | None,
                   hours: Collection[datetime] | None = None) -> dict[str, Any] | None:
    """Flush (``hours`` only, if given); ``None`` when there is no hot path."""
    client = connect_settings(ctx.settings, timeout=FLUSH_TIMEOUT)
    if client is None:
        return None
    try:
        summary = flush_usage(ctx.engine, client, release_before=release, hours=hours,
                              on_progress=ctx.progress)
    finally:
        client.close()
    log = structlog.get_logger("hostmeter.flush")
    for problem in summary.problems:
        log.warning("hot_path_value_skipped", problem=problem)
    return summary.as_dict()


def run(ctx: JobContext, logical_time: datetime) -> dict[str, Any]:
    counts = flush_hot_path(ctx, release=release_before(logical_time))
    if counts is None:
        structlog.get_logger("hostmeter.flush").info(
            "hot_path_not_configured", reason="HOSTMETER_REDIS_URL is not set")
        return {"tenant_hours": 0, "hot_path": "not configured"}
    return counts
