"""Hourly usage snapshots: set-based SQL from recorded usage into ``usage_snapshots``.

For hour ``[hs, he)`` one ``INSERT … SELECT`` writes a row for every tenant that has a plan in
effect at ``hs`` or any usage in the hour, and a second one writes the per-role
anomaly-detection counts. Before writing, the hour's old rows are deleted in the same
transaction, so re-running an hour reproduces identical rows and a reader never sees half an
hour.

Rules chosen here (stated in the README too):

- the **plan** is the one in effect at the start of the hour (the latest ``plan`` record with
  ``at <= hs``); a tenant without one has ``plan`` NULL and is never billed for the hour;
- a **monitor** counts in every hour its lifetime overlaps: created at 10:30 counts for the 10:00
  hour, deleted at 10:30 also counts for the 10:00 hour, deleted at 11:00 sharp does not count
  for the 11:00 hour;
- **anomaly-detection roles** and **role membership** follow the same overlap rule: a role
  enabled (or a host added) at any moment of the hour counts for the whole hour;
- a host that posted as ``standard`` and as ``micro`` in the same hour counts as standard.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from metering import models as m
from metering.db import UTCDateTime, upsert
from metering.timeutil import HOUR, floor_hour

__all__ = ["MetricLimits", "SnapshotResult", "snapshot_hour"]

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


def _on_during(
    table: sa.Table, keys: list[str], flag: str, hs: datetime, he: datetime
) -> sa.Subquery:
    """Entities (tenant_id + ``keys``) whose state ``flag`` was on at any moment of [hs, he).

    An entity is on during the hour when some "on" event happened before ``he`` and no "off"
    event happened between that "on" and the start of the hour (inclusive).
    """
    e = table.alias("e_on")
    f = table.alias("e_off")
    switched_off = (
        sa.select(sa.literal(1))
        .where(
            f.c.tenant_id == e.c.tenant_id,
            *[f.c[k] == e.c[k] for k in keys],
            f.c[flag].is_(False),
            f.c.at >= e.c.at,
            f.c.at <= sa.literal(hs, UTCDateTime),
        )
        .exists()
    )
    return (
        sa.select(e.c.tenant_id, *[e.c[k] for k in keys])
        .where(e.c[flag].is_(True), e.c.at < sa.literal(he, UTCDateTime), ~switched_off)
        .distinct()
        .subquery()
    )


def _lock_hour(conn: Connection, hs: datetime) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:k, :h)"),
            {"k": SNAPSHOT_LOCK_KEY & 0x7FFFFFFF, "h": int(hs.timestamp() // 3600)},
        )


def snapshot_hour(
    conn: Connection,
    hour: datetime,
    *,
    limits: MetricLimits,
    run_id: str,
    snapshotted_at: datetime,
) -> SnapshotResult:
    """(Re)write the snapshot of the hour containing ``hour`` inside the caller's transaction."""
    hs = floor_hour(hour)
    he = hs + HOUR
    hs_lit = sa.literal(hs, UTCDateTime)
    _lock_hour(conn, hs)

    us, ur = m.usage_snapshots, m.usage_snapshot_roles
    conn.execute(sa.delete(us).where(us.c.hour == hs))
    conn.execute(sa.delete(ur).where(ur.c.hour == hs))

    # Plan in effect at the start of the hour.
    pc = m.plan_changes
    latest = (
        sa.select(pc.c.tenant_id, sa.func.max(pc.c.at).label("at"))
        .where(pc.c.at <= hs_lit)
        .group_by(pc.c.tenant_id)
        .subquery("latest_plan")
    )
    plan = (
        sa.select(pc.c.tenant_id, pc.c.plan)
        .join(latest, sa.and_(pc.c.tenant_id == latest.c.tenant_id, pc.c.at == latest.c.at))
        .subquery("plan_now")
    )

    hh = m.host_hours
    std = hh.c.kind == "standard"
    micro = hh.c.kind == "micro"
    hosts = (
        sa.select(
            hh.c.tenant_id,
            sa.func.sum(sa.case((std, 1), else_=0)).label("s"),
            sa.func.sum(sa.case((micro, 1), else_=0)).label("u"),
            sa.func.sum(
                sa.case(
                    (std & (hh.c.metric_count > limits.standard),
                     hh.c.metric_count - limits.standard),
                    else_=0,
                )
            ).label("os"),
            sa.func.sum(
                sa.case(
                    (micro & (hh.c.metric_count > limits.micro), hh.c.metric_count - limits.micro),
                    else_=0,
                )
            ).label("ou"),
            sa.func.sum(hh.c.metric_count).label("hm"),
        )
        .where(hh.c.hour == hs_lit)
        .group_by(hh.c.tenant_id)
        .subquery("hosts_now")
    )

    sh = m.service_hours
    services = (
        sa.select(sh.c.tenant_id, sh.c.metric_count.label("sm"))
        .where(sh.c.hour == hs_lit)
        .subquery("services_now")
    )

    live_monitors = _on_during(m.monitor_events, ["monitor"], "present", hs, he)
    monitors = (
        sa.select(live_monitors.c.tenant_id, sa.func.count().label("x"))
        .group_by(live_monitors.c.tenant_id)
        .subquery("monitors_now")
    )

    t = m.tenants
    z = sa.literal(0)
    select_rows = (
        sa.select(
            t.c.id,
            hs_lit,
            plan.c.plan,
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
        .select_from(t)
        .outerjoin(plan, plan.c.tenant_id == t.c.id)
        .outerjoin(hosts, hosts.c.tenant_id == t.c.id)
        .outerjoin(services, services.c.tenant_id == t.c.id)
        .outerjoin(monitors, monitors.c.tenant_id == t.c.id)
        .where(
            sa.or_(
                plan.c.tenant_id.is_not(None),
                hosts.c.tenant_id.is_not(None),
                services.c.tenant_id.is_not(None),
                monitors.c.tenant_id.is_not(None),
            )
        )
    )
    conn.execute(
        sa.insert(us).from_select(
            [
                "tenant_id", "hour", "plan", "standard_hosts", "micro_hosts",
                "standard_overage", "micro_overage", "host_metrics", "service_metrics",
                "monitors", "standard_metric_limit", "micro_metric_limit",
            ],
            select_rows,
        )
    )

    # Anomaly detection: per enabled role, the active standard hosts that are members.
    roles = _on_during(m.role_events, ["role"], "enabled", hs, he)
    members = _on_during(m.role_member_events, ["role", "host_id"], "member", hs, he)
    active_members = (
        sa.select(members.c.tenant_id, members.c.role, members.c.host_id)
        .join(hh, sa.and_(hh.c.host_id == members.c.host_id, hh.c.hour == hs_lit, std))
        .subquery("active_members")
    )
    conn.execute(
        sa.insert(ur).from_select(
            ["tenant_id", "hour", "role", "hosts"],
            sa.select(roles.c.tenant_id, hs_lit, roles.c.role, sa.func.count(active_members.c.host_id))
            .select_from(roles)
            .outerjoin(
                active_members,
                sa.and_(
                    active_members.c.tenant_id == roles.c.tenant_id,
                    active_members.c.role == roles.c.role,
                ),
            )
            .group_by(roles.c.tenant_id, roles.c.role),
        )
    )

    totals = conn.execute(
        sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(us.c.standard_hosts), 0),
            sa.func.coalesce(sa.func.sum(us.c.micro_hosts), 0),
            sa.func.coalesce(sa.func.sum(us.c.host_metrics), 0),
        ).where(us.c.hour == hs_lit)
    ).one()
    role_rows = conn.execute(
        sa.select(sa.func.count()).select_from(ur).where(ur.c.hour == hs_lit)
    ).scalar_one()
    upsert(
        conn,
        m.snapshot_hours,
        [{"hour": hs, "snapshotted_at": snapshotted_at, "run_id": run_id, "tenants": totals[0]}],
        key=["hour"],
        update=["snapshotted_at", "run_id", "tenants"],
    )
    return SnapshotResult(
        hour=hs,
        tenants=int(totals[0]),
        roles=int(role_rows),
        standard_hosts=int(totals[1]),
        micro_hosts=int(totals[2]),
        host_metrics=int(totals[3]),
    )


def missing_hours(conn: Connection, start: datetime, end: datetime) -> list[datetime]:
    """Hours in ``[start, end)`` that have never been snapshotted (gaps)."""
    from metering.timeutil import hours_between

    sh = m.snapshot_hours
    done = {
        r[0]
        for r in conn.execute(
            sa.select(sh.c.hour).where(sh.c.hour >= start, sh.c.hour < end)
        )
    }
    return [h for h in hours_between(start, end) if h not in done]
