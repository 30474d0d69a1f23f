"""Retention of raw usage: ``prune-usage`` deletes recorded hours that are safely frozen.

Only hours that have been snapshotted are pruned, so nothing is lost that is not already in
``usage_snapshots``. The watermark (``usage_retention.pruned_before``) then marks their
snapshots as final: :func:`frozen_hours` tells re-snapshotting code (reruns, backfills) to keep
them, because recomputing an hour whose raw usage is gone would write zeros.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from metering import models as m
from metering.db import upsert

__all__ = ["PruneResult", "frozen_hours", "prune", "pruned_before"]

WATERMARK = "raw_usage"


@dataclass(frozen=True, slots=True, kw_only=True)
class PruneResult:
    """What one prune deleted."""

    cutoff: datetime
    host_hours: int
    service_hours: int


def pruned_before(conn: Connection) -> datetime | None:
    """Recorded hours before this instant may have been pruned (None: never pruned)."""
    r = m.usage_retention
    return conn.execute(
        sa.select(r.c.pruned_before).where(r.c.name == WATERMARK)
    ).scalar_one_or_none()


def frozen_hours(conn: Connection, hours: Iterable[datetime]) -> set[datetime]:
    """Those of ``hours`` whose snapshots are final: snapshotted and before the watermark."""
    mark = pruned_before(conn)
    early = [h for h in hours if mark is not None and h < mark]
    if not early:
        return set()
    sh = m.snapshot_hours
    covered = conn.execute(
        sa.select(sh.c.hour).where(sh.c.hour >= min(early), sh.c.hour <= max(early))
    ).scalars()
    return set(early) & set(covered)


def prune(conn: Connection, cutoff: datetime, *, now: datetime) -> PruneResult:
    """Delete recorded host and service hours before ``cutoff`` that have been snapshotted,
    and move the watermark to ``cutoff`` (never backwards). Two set-based DELETEs."""
    sh, hh, sv = m.snapshot_hours, m.host_hours, m.service_hours
    snapshotted = sa.select(sh.c.hour).where(sh.c.hour < cutoff)
    hosts = conn.execute(
        sa.delete(hh).where(hh.c.hour < cutoff, hh.c.hour.in_(snapshotted))
    ).rowcount
    services = conn.execute(
        sa.delete(sv).where(sv.c.hour < cutoff, sv.c.hour.in_(snapshotted))
    ).rowcount
    mark = pruned_before(conn)
    if mark is None or cutoff > mark:
        upsert(conn, m.usage_retention,
               [{"name": WATERMARK, "pruned_before": cutoff, "pruned_at": now}],
               key=["name"], update=["pruned_before", "pruned_at"])
    return PruneResult(cutoff=cutoff, host_hours=int(hosts), service_hours=int(services))
