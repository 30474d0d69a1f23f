"""What the bench checks after timing, and what cannot be faked: the snapshots add up to the
recorded host-hours, every hour was snapshotted by this run, the fleet was generated as
planned, and every paying tenant was invoiced exactly once."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billing.models import invoices as billing_invoices
from jobs.synthetic.bench.generate import GenerateResult
from jobs.synthetic.bench.measure import CloseTiming
from metering import models as m

__all__ = ["Check", "invoices_check", "run_checks"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One correctness check: its name, whether it held, and the numbers compared."""

    name: str
    ok: bool
    details: dict[str, Any] = field(default_factory=dict)


def run_checks(
    engine: Engine, start: datetime, end: datetime, hours: int, run_id: str,
    generated: GenerateResult,
) -> list[Check]:
    us, hh, sh = m.usage_snapshots, m.host_hours, m.snapshot_hours
    with engine.connect() as conn:
        snap_hosts, snap_metrics = conn.execute(
            sa.select(
                sa.func.coalesce(sa.func.sum(us.c.standard_hosts + us.c.micro_hosts), 0),
                sa.func.coalesce(sa.func.sum(us.c.host_metrics), 0),
            ).where(us.c.hour >= start, us.c.hour < end)
        ).one()
        rows, metrics = conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(hh.c.metric_count), 0))
            .where(hh.c.hour >= start, hh.c.hour < end)
        ).one()
        covered = conn.execute(
            sa.select(sa.func.count()).select_from(sh)
            .where(sh.c.hour >= start, sh.c.hour < end, sh.c.run_id == run_id)
        ).scalar_one()
        conn.rollback()
    return [
        Check(name="snapshot_hosts_equal_host_hours", ok=int(snap_hosts) == int(rows),
              details={"snapshot_hosts": int(snap_hosts), "host_hours": int(rows)}),
        Check(name="snapshot_metrics_equal_host_metrics", ok=int(snap_metrics) == int(metrics),
              details={"snapshot_metrics": int(snap_metrics), "host_metrics": int(metrics)}),
        Check(name="every_hour_snapshotted", ok=int(covered) == hours,
              details={"hours": hours, "snapshotted_by_this_run": int(covered)}),
        Check(name="generated_as_planned", ok=generated.as_planned,
              details={"generated": generated.counts, "planned": generated.planned}),
    ]


def invoices_check(engine: Engine, period: str, start: datetime, end: datetime,
                    close: CloseTiming) -> Check:
    """Every tenant with a paid hour in the month got exactly one invoice, and nobody else."""
    us, inv = m.usage_snapshots, billing_invoices
    with engine.connect() as conn:
        paying = conn.execute(
            sa.select(sa.func.count(sa.distinct(us.c.tenant_id)))
            .where(us.c.hour >= start, us.c.hour < end, us.c.plan == "standard")
        ).scalar_one()
        invoiced = conn.execute(
            sa.select(sa.func.count()).select_from(inv).where(inv.c.period == period)
        ).scalar_one()
        conn.rollback()
    return Check(name="every_paying_tenant_invoiced",
                 ok=int(paying) == int(invoiced) == close.invoices_written,
                 details={"paying_tenants": int(paying), "invoices": int(invoiced),
                          "written_by_close": close.invoices_written})


