"""Read-side queries over ``usage_snapshots``: the per-tenant usage summary of a month."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from metering import models as m

__all__ = ["TenantMonth", "coverage", "month_usage"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantMonth:
    """A tenant's hour sums over a month of snapshots (all hours, paid or not)."""

    tenant: str
    hours: int
    standard_hours: int
    trial_hours: int
    free_hours: int
    standard_host_hours: int
    micro_host_hours: int
    standard_overage: int
    micro_overage: int
    service_metrics: int
    monitors: int
    max_host_metrics: int

    @property
    def main_plan(self) -> str:
        plans = {"standard": self.standard_hours, "trial": self.trial_hours,
                 "free": self.free_hours}
        best = max(plans, key=lambda k: plans[k])
        return best if plans[best] else "-"


def month_usage(conn: Connection, start: datetime, end: datetime) -> list[TenantMonth]:
    """One set-based aggregate over the month's snapshots, one row per tenant."""
    us, t = m.usage_snapshots, m.tenants

    def plan_hours(plan: str) -> sa.ColumnElement[int]:
        return sa.func.sum(sa.case((us.c.plan == plan, 1), else_=0))

    rows = conn.execute(
        sa.select(
            t.c.key,
            sa.func.count(),
            plan_hours("standard"),
            plan_hours("trial"),
            plan_hours("free"),
            sa.func.sum(us.c.standard_hosts),
            sa.func.sum(us.c.micro_hosts),
            sa.func.sum(us.c.standard_overage),
            sa.func.sum(us.c.micro_overage),
            sa.func.sum(us.c.service_metrics),
            sa.func.sum(us.c.monitors),
            sa.func.max(us.c.host_metrics),
        )
        .join(t, t.c.id == us.c.tenant_id)
        .where(us.c.hour >= start, us.c.hour < end)
        .group_by(t.c.key)
        .order_by(t.c.key)
    )
    return [
        TenantMonth(
            tenant=r[0], hours=r[1], standard_hours=int(r[2]), trial_hours=int(r[3]),
            free_hours=int(r[4]), standard_host_hours=int(r[5]), micro_host_hours=int(r[6]),
            standard_overage=int(r[7]), micro_overage=int(r[8]), service_metrics=int(r[9]),
            monitors=int(r[10]), max_host_metrics=int(r[11]),
        )
        for r in rows
    ]


def coverage(conn: Connection, start: datetime, end: datetime) -> int:
    """How many hours of ``[start, end)`` have been snapshotted."""
    sh = m.snapshot_hours
    return int(
        conn.execute(
            sa.select(sa.func.count()).where(sh.c.hour >= start, sh.c.hour < end)
        ).scalar_one()
    )
