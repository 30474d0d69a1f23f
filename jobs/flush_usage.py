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

from datetime import datetime
from typing import Any

import structlog

from jobs.runtime.context import JobContext
from metering.flush import flush_configured
from metering.snapshot import DEFAULT_LOOKBACK
from metering.timeutil import HOUR, floor_hour

__all__ = ["release_before", "run"]

def release_before(logical_time: datetime, lookback: int = DEFAULT_LOOKBACK) -> datetime:
    """Tenant-hours before this instant may leave Redis once they are in the database: the last
    hourly snapshot that looks at them (``lookback`` hours later) has run."""
    return floor_hour(logical_time) - (lookback + 1) * HOUR


def run(ctx: JobContext, logical_time: datetime) -> dict[str, Any]:
    log = structlog.get_logger("hostmeter.flush")
    summary = flush_configured(ctx.engine, ctx.settings,
                               release_before=release_before(logical_time),
                               on_progress=ctx.progress)
    if summary is None:
        log.info("hot_path_not_configured", reason="HOSTMETER_REDIS_URL is not set")
        return {"tenant_hours": 0, "hot_path": "not configured"}
    for problem in summary.problems:
        log.warning("hot_path_value_skipped", problem=problem)
    return summary.as_dict()
