"""Retention of raw usage: ``prune-usage`` deletes recorded hours that are safely frozen.

Only hours that have been snapshotted are pruned, so nothing is lost that is not already in
``usage_snapshots``. The watermark (``usage_retention.pruned_before``) then marks their
snapshots as final: :func:`frozen_hours` tells re-snapshotting code (reruns, backfills) to keep
them, because recomputing an hour whose raw usage is gone would write zeros.

On PostgreSQL (monthly partitions, :mod:`metering.partitions`) a UTC month that ends at or
before the cut-off and holds no hour that was never snapshotted is dropped whole, its rows
counted first; what remains before the cut-off (the rest of a month the cut-off falls in, the
DEFAULT partition, a month with unsnapshotted hours, or every month when the role may not drop
partitions or their lock is not granted in time) is deleted row by row, as on SQLite.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from metering import models as m
from metering.db import upsert
from metering.partitions import Partition, drop_months_before

__all__ = ["PruneResult", "frozen_hours", "prune", "pruned_before"]

WATERMARK = "raw_usage"


@dataclass(frozen=True, slots=True, kw_only=True)
class PruneResult:
    """What one prune deleted."""

    cutoff: datetime
    host_hours: int
    service_hours: int
    partitions_dropped: int = 0
    partitions_skipped: str | None = None


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


def _all_snapshotted(conn: Connection, part: Partition) -> bool:
    """Whether every row of the partition is of a snapshotted hour (so it may go whole)."""
    return not conn.exec_driver_sql(
        f'SELECT EXISTS (SELECT 1 FROM "{part.name}" p WHERE NOT EXISTS '
        "(SELECT 1 FROM snapshot_hours s WHERE s.hour = p.hour))").scalar_one()


def prune(conn: Connection, cutoff: datetime, *, now: datetime,
          lock_timeout: float | None = None) -> PruneResult:
    """Delete recorded host and service hours before ``cutoff`` that have been snapshotted,
    and move the watermark to ``cutoff`` (never backwards). Whole monthly partitions are
    dropped where they can be (``lock_timeout``: see :func:`drop_months_before`), then two
    set-based DELETEs take the rest."""
    sh, hh, sv = m.snapshot_hours, m.host_hours, m.service_hours
    dropped = drop_months_before(conn, cutoff, tables=(hh.name, sv.name),
                                 droppable=_all_snapshotted, lock_timeout=lock_timeout)
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
    return PruneResult(cutoff=cutoff,
                       host_hours=int(hosts) + dropped.rows.get(hh.name, 0),
                       service_hours=int(services) + dropped.rows.get(sv.name, 0),
                       partitions_dropped=len(dropped.dropped),
                       partitions_skipped=dropped.skipped)
