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

So a tenant-hour gets a row when the tenant has, in that hour, a host-hour or a service-hour
recorded, a plan in effect at its start, or a monitor alive in it. An enabled anomaly-detection
role alone gives no row (only a ``usage_snapshot_roles`` row of 0 hosts): the hosts it counts are
active hosts, which give the row.

What a run wrote, and what it should have written, are read by statements of their own, for
the job's logs and its completeness counts: :func:`tenant_hours` reads the written rows back
with the tenants' keys (one ``SELECT``), and :func:`expected_tenant_hours` counts the
tenant-hours that should have a row straight from recorded usage by the rule above, sharing no
SQL with the snapshot: a snapshot statement that loses a tenant shows as fewer rows than
expected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from metering import models as m
from metering.db import UTCDateTime, upsert
from metering.timeutil import HOUR, floor_hour, hours_between

__all__ = ["DEFAULT_LOOKBACK", "MetricLimits", "SnapshotResult", "TenantHour",
           "expected_tenant_hours", "missing_hours", "snapshot_hour", "snapshot_hours",
           "tenant_hours"]

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


class TenantHour(NamedTuple):
    """One ``usage_snapshots`` row with its tenant's key, as ``snapshot-usage`` logs it (a
    named tuple, not a dataclass: a run reads one per tenant-hour, tens of thousands)."""

    tenant: str
    hour: datetime
    plan: str | None
    standard_hosts: int
    micro_hosts: int
    host_metrics: int
    overage: int
    """Standard and micro metric overage together."""
    service_metrics: int
    monitors: int


HourFilter = Callable[[sa.ColumnElement[datetime]], sa.ColumnElement[bool]]
"""``col`` → the condition that ``col`` is one of a statement's hours."""


def _hour_filter(todo: Sequence[datetime],
                 listed: sa.ScalarSelect[Any] | None = None) -> HourFilter:
    """For sorted hours ``todo``: a range when they are contiguous (the usual case, and a plain
    index range scan), else also ``IN`` the hours (``listed``, a subquery of them, or else the
    list itself)."""
    first, last = todo[0], todo[-1] + HOUR
    contiguous = len(todo) == int((last - first) / HOUR)

    def in_hours(col: sa.ColumnElement[datetime]) -> sa.ColumnElement[bool]:
        within = sa.and_(col >= first, col < last)
        if contiguous:
            return within
        return sa.and_(within, col.in_(listed if listed is not None else list(todo)))

    return in_hours


def _on_intervals(table: sa.Table, keys: list[str], flag: str) -> sa.Subquery:
    """Each "on" event with the first "off" event at or after it: ``[on_at, off_at)``.

    An entity is on during hour ``[hs, he)`` when some interval has ``on_at < he`` and
    ``off_at`` NULL or ``> hs`` — the overlap rule.

    ``off_at`` is a running minimum over the entity's events from the latest back (one window
    pass over the table), not a subquery per event and hour. At the same instant the "off"
    event sorts first, so it is inside the frame of an "on" at that instant: the "off" wins.
    """
    part = [table.c.tenant_id, *[table.c[k] for k in keys]]
    off_at = sa.func.min(sa.case((table.c[flag].is_(False), table.c.at))).over(
        partition_by=part,
        order_by=[table.c.at.desc(), table.c[flag].asc()],
        rows=(None, 0),
    )
    events = sa.select(*part, table.c.at.label("on_at"), table.c[flag].label("on"),
                       off_at.label("off_at")).subquery()
    return (
        sa.select(events.c.tenant_id, *[events.c[k] for k in keys], events.c.on_at,
                  events.c.off_at)
        .where(events.c.on.is_(True))
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
        # Short statements over a day of rows: compiling them (JIT) costs more than it saves,
        # and the per-(tenant, hour) aggregate should not spill to disk.
        conn.execute(sa.text("SET LOCAL jit = off"))
        conn.execute(sa.text("SET LOCAL work_mem = '64MB'"))


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
    in_hours = _hour_filter(todo, sa.select(hrs.c.hour).scalar_subquery())

    us, ur = m.usage_snapshots, m.usage_snapshot_roles
    conn.execute(sa.delete(us).where(in_hours(us.c.hour)))
    conn.execute(sa.delete(ur).where(in_hours(ur.c.hour)))
    conn.execute(
        sa.insert(us).from_select(
            ["tenant_id", "hour", "plan", "standard_hosts", "micro_hosts", "standard_overage",
             "micro_overage", "host_metrics", "service_metrics", "monitors",
             "standard_metric_limit", "micro_metric_limit"],
            _usage_rows(hrs, in_hours, limits),
        )
    )

    # Anomaly detection: per enabled role and hour, the active standard hosts that are members.
    hh = m.host_hours
    roles = _overlapping(_on_intervals(m.role_events, ["role"], "enabled"), hrs, ["role"])
    members = _overlapping(
        _on_intervals(m.role_member_events, ["role", "host_id"], "member"), hrs,
        ["role", "host_id"],
    )
    active = (
        sa.select(members.c.tenant_id, members.c.role, members.c.hour,
                  sa.func.count().label("hosts"))
        .join(hh, sa.and_(hh.c.host_id == members.c.host_id, hh.c.hour == members.c.hour,
                          hh.c.kind == "standard"))
        .group_by(members.c.tenant_id, members.c.role, members.c.hour)
        .subquery("active")
    )
    conn.execute(
        sa.insert(ur).from_select(
            ["tenant_id", "hour", "role", "hosts"],
            sa.select(roles.c.tenant_id, roles.c.hour, roles.c.role,
                      sa.func.coalesce(active.c.hosts, 0))
            .select_from(roles)
            .outerjoin(
                active,
                sa.and_(active.c.tenant_id == roles.c.tenant_id,
                        active.c.role == roles.c.role,
                        active.c.hour == roles.c.hour),
            ),
        )
    )

    # What was written, per hour (for the coverage table, logs and counts).
    totals = {
        r[0]: r[1:]
        for r in conn.execute(
            sa.select(us.c.hour, sa.func.count(), sa.func.sum(us.c.standard_hosts),
                      sa.func.sum(us.c.micro_hosts), sa.func.sum(us.c.host_metrics))
            .where(in_hours(us.c.hour))
            .group_by(us.c.hour)
        )
    }
    role_rows: dict[datetime, int] = dict(
        conn.execute(
            sa.select(ur.c.hour, sa.func.count())
            .where(in_hours(ur.c.hour))
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


def _usage_rows(hrs: sa.CTE, in_hours: HourFilter, limits: MetricLimits) -> sa.Select[Any]:
    """The snapshot's ``SELECT``: a row per (tenant, hour) of ``hrs`` that has a plan in effect
    or any usage, in the column order of :func:`snapshot_hours`' ``INSERT``."""
    # Every source contributes rows of (tenant_id, hour, plan, s, u, os, ou, hm, sm, x); one
    # GROUP BY sums them into a row per (tenant, hour). This reads each source once and needs
    # no key union and no joins between the sources.
    names = ("s", "u", "os", "ou", "hm", "sm", "x")

    def source(tenant_id: sa.ColumnElement[int], hour: sa.ColumnElement[datetime],
               plan: sa.ColumnElement[str] | None = None,
               **values: sa.ColumnElement[int] | int) -> list[sa.ColumnElement[Any]]:
        """One source's columns in the common shape; quantities it does not have are 0."""
        return [tenant_id.label("tenant_id"), hour.label("hour"),
                (plan if plan is not None else sa.null().cast(sa.String(16))).label("plan"),
                *[sa.literal(v).label(k) if isinstance(v := values.get(k, 0), int)
                  else v.label(k) for k in names]]

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
        sa.select(*source(plan_iv.c.tenant_id, hrs.c.hour, plan_iv.c.plan))
        .join(hrs, sa.and_(plan_iv.c.valid_from <= hrs.c.hour,
                           sa.or_(plan_iv.c.valid_to.is_(None), plan_iv.c.valid_to > hrs.c.hour)))
    )

    hh = m.host_hours
    std = hh.c.kind == "standard"
    micro = hh.c.kind == "micro"
    # Host-hours, the bulk of the rows, are summed per (hour, tenant) first: in the order of
    # their (hour, tenant_id) index, so SQLite groups them as it scans instead of sorting every
    # host-hour; the outer GROUP BY then sees one row per tenant-hour from them.
    hosts = sa.select(*source(
        hh.c.tenant_id, hh.c.hour,
        s=sa.func.sum(sa.case((std, 1), else_=0)),
        u=sa.func.sum(sa.case((micro, 1), else_=0)),
        os=sa.func.sum(sa.case((std & (hh.c.metric_count > limits.standard),
                                hh.c.metric_count - limits.standard), else_=0)),
        ou=sa.func.sum(sa.case((micro & (hh.c.metric_count > limits.micro),
                                hh.c.metric_count - limits.micro), else_=0)),
        hm=sa.func.sum(hh.c.metric_count),
    )).where(in_hours(hh.c.hour)).group_by(hh.c.hour, hh.c.tenant_id)

    sh = m.service_hours
    services = sa.select(*source(sh.c.tenant_id, sh.c.hour, sm=sh.c.metric_count)).where(
        in_hours(sh.c.hour))

    live = _overlapping(_on_intervals(m.monitor_events, ["monitor"], "present"), hrs, ["monitor"])
    monitors = sa.select(*source(live.c.tenant_id, live.c.hour, x=sa.func.count())).group_by(
        live.c.tenant_id, live.c.hour)

    src = sa.union_all(plans, hosts, services, monitors).subquery("src")
    return sa.select(
        src.c.tenant_id, src.c.hour, sa.func.max(src.c.plan),
        *[sa.func.sum(src.c[k]) for k in names],
        sa.literal(limits.standard).label("standard_metric_limit"),
        sa.literal(limits.micro).label("micro_metric_limit"),
    ).group_by(src.c.tenant_id, src.c.hour).order_by(src.c.tenant_id, src.c.hour)


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


def tenant_hours(conn: Connection, hours: Sequence[datetime]) -> list[TenantHour]:
    """The ``usage_snapshots`` rows of ``hours`` with their tenants' keys, by hour and key: a
    ``SELECT`` per hour (the hour is not read back row by row). In :func:`snapshot_hours`'
    transaction, after it: the rows it just wrote."""
    us, t = m.usage_snapshots, m.tenants
    of_hour = (
        sa.select(t.c.key, us.c.plan, us.c.standard_hosts, us.c.micro_hosts, us.c.host_metrics,
                  us.c.standard_overage + us.c.micro_overage, us.c.service_metrics,
                  us.c.monitors)
        .join(t, t.c.id == us.c.tenant_id)
        .where(us.c.hour == sa.bindparam("hour", type_=UTCDateTime))
        .order_by(t.c.key)
    )
    out: list[TenantHour] = []
    # Held until the caller's commit: each key and plan is kept once, not once per hour.
    keys: dict[str, str] = {}
    plans: dict[str | None, str | None] = {}
    for hour in sorted({floor_hour(h) for h in hours}):
        out += [TenantHour(keys.setdefault(key, key), hour, plans.setdefault(plan, plan),
                           *counts)
                for key, plan, *counts in conn.execute(of_hour, {"hour": hour}).all()]
    return out


def expected_tenant_hours(conn: Connection, hours: Sequence[datetime]) -> int:
    """How many (tenant, hour) pairs of ``hours`` should have a ``usage_snapshots`` row, by the
    rule of the module docstring, counted from recorded usage with a statement that shares
    nothing with the snapshot's: a host-hour or a service-hour in the hour, a plan record at
    or before its start (every tenant's plan stays in effect from its first record on), or a
    monitor created before the hour ends and not deleted between its creation and the hour's
    start (at the same instant, the deletion wins)."""
    todo = sorted({floor_hour(h) for h in hours})
    if not todo:
        return 0
    in_hours = _hour_filter(todo)
    hrs = (
        sa.values(sa.column("hour", UTCDateTime), sa.column("hour_end", UTCDateTime),
                  name="expected_hours")
        .data([(h, h + HOUR) for h in todo])
        .cte("expected_hours")
    )
    hh, sh, pc = m.host_hours, m.service_hours, m.plan_changes
    hosts = (sa.select(hh.c.tenant_id, hh.c.hour).where(in_hours(hh.c.hour))
             .group_by(hh.c.hour, hh.c.tenant_id))
    services = sa.select(sh.c.tenant_id, sh.c.hour).where(in_hours(sh.c.hour))
    first_plan = (sa.select(pc.c.tenant_id, sa.func.min(pc.c.at).label("since"))
                  .group_by(pc.c.tenant_id).subquery("first_plan"))
    planned = (sa.select(first_plan.c.tenant_id, hrs.c.hour)
               .join(hrs, first_plan.c.since <= hrs.c.hour))
    created, deleted = m.monitor_events.alias("created"), m.monitor_events.alias("deleted")
    monitored = (
        sa.select(created.c.tenant_id, hrs.c.hour)
        .join(hrs, created.c.at < hrs.c.hour_end)
        .where(
            created.c.present.is_(True),
            ~sa.exists().where(
                deleted.c.tenant_id == created.c.tenant_id,
                deleted.c.monitor == created.c.monitor,
                deleted.c.present.is_(False),
                deleted.c.at >= created.c.at,
                deleted.c.at <= hrs.c.hour,
            ),
        )
    )
    pairs = sa.union(hosts, services, planned, monitored).subquery("expected")
    return int(conn.execute(sa.select(sa.func.count()).select_from(pairs)).scalar_one())
