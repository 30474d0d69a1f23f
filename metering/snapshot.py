"""Hourly usage snapshots: set-based SQL from recorded usage into ``usage_snapshots``.

:func:`snapshot_hours` freezes any set of hours with a handful of statements for all tenants and
all those hours at once: it deletes the hours' old rows, then one ``INSERT … SELECT`` writes a row
for every (tenant, hour) where the tenant has a plan in effect or any usage, and a second one
writes the per-role anomaly-detection counts. All of it runs in the caller's transaction, so a
reader never sees half an hour and re-running hours reproduces identical rows.

The hours enter the SQL as a ``VALUES`` table of ``(hour, hour_end)``; state changes (plans,
monitors, roles, memberships) become intervals and are range-joined to it.

Rules chosen here (stated in the README too):

- the **plan** is the one in effect at the start of the hour (the latest ``plan`` record with
  ``at <= hs``); a tenant without one has ``plan`` NULL and is never billed for the hour;
- a **monitor** counts in every hour its lifetime overlaps: created at 10:30 counts for the 10:00
  hour, deleted at 10:30 also counts for the 10:00 hour, deleted at 11:00 sharp does not count
  for the 11:00 hour;
- **anomaly-detection roles** and **role membership** follow the same overlap rule: a role
  enabled (or a host added) at any moment of the hour counts for the whole hour;
- an "on" and an "off" record at the very same instant: the "off" wins (the monitor, role or
  membership is not on after that instant until a later "on");
- a host that posted as ``standard`` and as ``micro`` in the same hour counts as standard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from metering import models as m
from metering.db import UTCDateTime, upsert
from metering.timeutil import HOUR, floor_hour, hours_between

__all__ = ["DEFAULT_LOOKBACK", "MetricLimits", "SnapshotResult", "missing_hours", "snapshot_hour",
           "snapshot_hours"]

DEFAULT_LOOKBACK = 3
"""Earlier hours the hourly trigger snapshots again, besides the hour that just ended, to take in
posts that arrived late (``snapshot-usage --lookback``)."""

SNAPSHOT_LOCK_KEY = 0x686D5F736E70  # "hm_snp"


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricLimits:
    """Per-host metric limits above which metrics are overage (from the catalog in force)."""

    standard: int = 200
    micro: int = 30


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotResult:
    """What snapshotting one hour wrote."""

    hour: datetime
    tenants: int
    roles: int
    standard_hosts: int
    micro_hosts: int
    host_metrics: int


def _on_intervals(table: sa.Table, keys: list[str], flag: str) -> sa.Subquery:
    """Each "on" event with the first "off" event at or after it: ``[on_at, off_at)``.

    An entity is on during hour ``[hs, he)`` when some interval has ``on_at < he`` and
    ``off_at`` NULL or ``> hs`` — the overlap rule.
    """
    e = table.alias("e_on")
    f = table.alias("e_off")
    off_at = (
        sa.select(sa.func.min(f.c.at))
        .where(
            f.c.tenant_id == e.c.tenant_id,
            *[f.c[k] == e.c[k] for k in keys],
            f.c[flag].is_(False),
            f.c.at >= e.c.at,
        )
        .scalar_subquery()
    )
    return (
        sa.select(e.c.tenant_id, *[e.c[k] for k in keys], e.c.at.label("on_at"),
                  off_at.label("off_at"))
        .where(e.c[flag].is_(True))
        .subquery()
    )


def _overlapping(intervals: sa.Subquery, hrs: sa.FromClause, keys: list[str]) -> sa.Subquery:
    """(tenant_id, keys…, hour) for every hour an interval overlaps, once."""
    return (
        sa.select(intervals.c.tenant_id, *[intervals.c[k] for k in keys], hrs.c.hour)
        .join(
            hrs,
            sa.and_(
                intervals.c.on_at < hrs.c.hour_end,
                sa.or_(intervals.c.off_at.is_(None), intervals.c.off_at > hrs.c.hour),
            ),
        )
        .distinct()
        .subquery()
    )


def _lock(conn: Connection) -> None:
    # One snapshot writer at a time on PostgreSQL (SQLite's BEGIN IMMEDIATE already serialises).
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": SNAPSHOT_LOCK_KEY})


def snapshot_hours(
    conn: Connection,
    hours: Sequence[datetime],
    *,
    limits: MetricLimits,
    run_id: str,
    snapshotted_at: datetime,
) -> list[SnapshotResult]:
    """(Re)write the snapshots of ``hours`` inside the caller's transaction, oldest first."""
    todo = sorted({floor_hour(h) for h in hours})
    if not todo:
        return []
    _lock(conn)
    hrs = (
        sa.values(sa.column("hour", UTCDateTime), sa.column("hour_end", UTCDateTime),
                  name="hrs")
        .data([(h, h + HOUR) for h in todo])
        .cte("hrs")
    )
    hour_list = sa.select(hrs.c.hour).scalar_subquery()
    first, last = todo[0], todo[-1] + HOUR

    us, ur = m.usage_snapshots, m.usage_snapshot_roles
    conn.execute(sa.delete(us).where(us.c.hour >= first, us.c.hour < last,
                                     us.c.hour.in_(hour_list)))
    conn.execute(sa.delete(ur).where(ur.c.hour >= first, ur.c.hour < last,
                                     ur.c.hour.in_(hour_list)))

    # Plan in effect at the start of each hour: plan intervals [at, next at) range-joined.
    pc = m.plan_changes
    plan_iv = sa.select(
        pc.c.tenant_id,
        pc.c.plan,
        pc.c.at.label("valid_from"),
        sa.func.lead(pc.c.at).over(partition_by=pc.c.tenant_id, order_by=pc.c.at)
        .label("valid_to"),
    ).subquery("plan_iv")
    plans = (
        sa.select(plan_iv.c.tenant_id, hrs.c.hour, plan_iv.c.plan)
        .join(hrs, sa.and_(plan_iv.c.valid_from <= hrs.c.hour,
                           sa.or_(plan_iv.c.valid_to.is_(None), plan_iv.c.valid_to > hrs.c.hour)))
        .cte("plans")
    )

    hh = m.host_hours
    std = hh.c.kind == "standard"
    micro = hh.c.kind == "micro"
    in_hours = sa.and_(hh.c.hour >= first, hh.c.hour < last, hh.c.hour.in_(hour_list))
    hosts = (
        sa.select(
            hh.c.tenant_id,
            hh.c.hour,
            sa.func.sum(sa.case((std, 1), else_=0)).label("s"),
            sa.func.sum(sa.case((micro, 1), else_=0)).label("u"),
            sa.func.sum(sa.case((std & (hh.c.metric_count > limits.standard),
                                 hh.c.metric_count - limits.standard), else_=0)).label("os"),
            sa.func.sum(sa.case((micro & (hh.c.metric_count > limits.micro),
                                 hh.c.metric_count - limits.micro), else_=0)).label("ou"),
            sa.func.sum(hh.c.metric_count).label("hm"),
        )
        .where(in_hours)
        .group_by(hh.c.tenant_id, hh.c.hour)
        .cte("hosts_agg")
    )

    sh = m.service_hours
    services = (
        sa.select(sh.c.tenant_id, sh.c.hour, sh.c.metric_count.label("sm"))
        .where(sh.c.hour >= first, sh.c.hour < last, sh.c.hour.in_(hour_list))
        .cte("services")
    )

    live = _overlapping(_on_intervals(m.monitor_events, ["monitor"], "present"), hrs, ["monitor"])
    monitors = (
        sa.select(live.c.tenant_id, live.c.hour, sa.func.count().label("x"))
        .group_by(live.c.tenant_id, live.c.hour)
        .cte("monitors")
    )

    keys = sa.union(
        sa.select(plans.c.tenant_id, plans.c.hour),
        sa.select(hosts.c.tenant_id, hosts.c.hour),
        sa.select(services.c.tenant_id, services.c.hour),
        sa.select(monitors.c.tenant_id, monitors.c.hour),
    ).subquery("keys")

    def on_key(t: sa.CTE) -> sa.ColumnElement[bool]:
        return sa.and_(t.c.tenant_id == keys.c.tenant_id, t.c.hour == keys.c.hour)

    z = sa.literal(0)
    rows = (
        sa.select(
            keys.c.tenant_id,
            keys.c.hour,
            plans.c.plan,
            sa.func.coalesce(hosts.c.s, z),
            sa.func.coalesce(hosts.c.u, z),
            sa.func.coalesce(hosts.c.os, z),
            sa.func.coalesce(hosts.c.ou, z),
            sa.func.coalesce(hosts.c.hm, z),
            sa.func.coalesce(services.c.sm, z),
            sa.func.coalesce(monitors.c.x, z),
            sa.literal(limits.standard),
            sa.literal(limits.micro),
        )
        .select_from(keys)
        .outerjoin(plans, on_key(plans))
        .outerjoin(hosts, on_key(hosts))
        .outerjoin(services, on_key(services))
        .outerjoin(monitors, on_key(monitors))
    )
    conn.execute(
        sa.insert(us).from_select(
            ["tenant_id", "hour", "plan", "standard_hosts", "micro_hosts", "standard_overage",
             "micro_overage", "host_metrics", "service_metrics", "monitors",
             "standard_metric_limit", "micro_metric_limit"],
            rows,
        )
    )

    # Anomaly detection: per enabled role and hour, the active standard hosts that are members.
    roles = _overlapping(_on_intervals(m.role_events, ["role"], "enabled"), hrs, ["role"])
    members = _overlapping(
        _on_intervals(m.role_member_events, ["role", "host_id"], "member"), hrs,
        ["role", "host_id"],
    )
    active_members = (
        sa.select(members.c.tenant_id, members.c.role, members.c.hour, members.c.host_id)
        .join(hh, sa.and_(hh.c.host_id == members.c.host_id, hh.c.hour == members.c.hour, std))
        .subquery("active_members")
    )
    conn.execute(
        sa.insert(ur).from_select(
            ["tenant_id", "hour", "role", "hosts"],
            sa.select(roles.c.tenant_id, roles.c.hour, roles.c.role,
                      sa.func.count(active_members.c.host_id))
            .select_from(roles)
            .outerjoin(
                active_members,
                sa.and_(active_members.c.tenant_id == roles.c.tenant_id,
                        active_members.c.role == roles.c.role,
                        active_members.c.hour == roles.c.hour),
            )
            .group_by(roles.c.tenant_id, roles.c.hour, roles.c.role),
        )
    )

    # What was written, per hour (for the coverage table, logs and counts).
    totals = {
        r[0]: r[1:]
        for r in conn.execute(
            sa.select(us.c.hour, sa.func.count(), sa.func.sum(us.c.standard_hosts),
                      sa.func.sum(us.c.micro_hosts), sa.func.sum(us.c.host_metrics))
            .where(us.c.hour >= first, us.c.hour < last, us.c.hour.in_(hour_list))
            .group_by(us.c.hour)
        )
    }
    role_rows: dict[datetime, int] = dict(
        conn.execute(
            sa.select(ur.c.hour, sa.func.count())
            .where(ur.c.hour >= first, ur.c.hour < last, ur.c.hour.in_(hour_list))
            .group_by(ur.c.hour)
        ).all()
    )
    results = []
    for h in todo:
        n, s, u, hm = totals.get(h, (0, 0, 0, 0))
        results.append(SnapshotResult(hour=h, tenants=int(n), roles=int(role_rows.get(h, 0)),
                                      standard_hosts=int(s or 0), micro_hosts=int(u or 0),
                                      host_metrics=int(hm or 0)))
    upsert(
        conn,
        m.snapshot_hours,
        [{"hour": r.hour, "snapshotted_at": snapshotted_at, "run_id": run_id,
          "tenants": r.tenants} for r in results],
        key=["hour"],
        update=["snapshotted_at", "run_id", "tenants"],
    )
    return results


def snapshot_hour(
    conn: Connection,
    hour: datetime,
    *,
    limits: MetricLimits,
    run_id: str,
    snapshotted_at: datetime,
) -> SnapshotResult:
    """(Re)write the snapshot of the hour containing ``hour`` inside the caller's transaction."""
    [result] = snapshot_hours(conn, [hour], limits=limits, run_id=run_id,
                              snapshotted_at=snapshotted_at)
    return result


def missing_hours(conn: Connection, start: datetime, end: datetime) -> list[datetime]:
    """Hours in ``[start, end)`` that have never been snapshotted (gaps)."""
    sh = m.snapshot_hours
    done = {
        r[0]
        for r in conn.execute(
            sa.select(sh.c.hour).where(sh.c.hour >= start, sh.c.hour < end)
        )
    }
    return [h for h in hours_between(start, end) if h not in done]
