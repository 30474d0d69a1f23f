"""What the bench checks after timing, and what cannot be faked: the snapshots add up to the
recorded host-hours, every hour was snapshotted by this run, the fleet was generated as
planned, every paying tenant was invoiced exactly once, the invoices add up to what one plain
SQL statement computes from the snapshots and the catalog, and the hour recorded through the
Redis hot path reached the database as posted and left Redis."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billing.catalog import Catalog, catalog_for
from billing.models import invoices as billing_invoices
from jobs.synthetic.bench.generate import GenerateResult
from jobs.synthetic.bench.measure import CloseTiming
from metering import models as m
from metering.db import UTCDateTime
from metering.timeutil import HOUR

__all__ = ["Check", "expected_totals_sql", "hot_path_checks", "invoice_totals_check",
           "invoices_check", "run_checks"]


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
    """Every tenant with a paid hour in the month got exactly one invoice, and nobody else; and
    the invoices add up to what one plain statement computes from the snapshots and the
    catalog (:func:`invoice_totals_check`, whose numbers are under ``details["totals"]``)."""
    us, inv = m.usage_snapshots, billing_invoices
    with engine.connect() as conn:
        paying = conn.execute(
            sa.select(sa.func.count(sa.distinct(us.c.tenant_id)))
            .where(us.c.hour >= start, us.c.hour < end, us.c.plan == "standard")
        ).scalar_one()
        invoiced, tenants_invoiced = conn.execute(
            sa.select(sa.func.count(), sa.func.count(sa.distinct(inv.c.tenant_id)))
            .where(inv.c.period == period)
        ).one()
        conn.rollback()
    totals = invoice_totals_check(engine, period, start, end)
    once = int(paying) == int(invoiced) == int(tenants_invoiced) == close.invoices_written
    return Check(name="every_paying_tenant_invoiced", ok=once and totals.ok,
                 details={"paying_tenants": int(paying), "invoices": int(invoiced),
                          "tenants_invoiced": int(tenants_invoiced),
                          "written_by_close": close.invoices_written,
                          "totals": {"ok": totals.ok, **totals.details}})


def expected_totals_sql(catalog: Catalog, hours_in_month: int) -> str:
    """One plain statement: the number of invoices and the sum of their totals, computed from
    ``usage_snapshots`` (and ``usage_snapshot_roles``) with the catalog's numbers as literals.

    It restates BILLING_RULES.md §3–§4 in SQL, independently of :mod:`billing.rules`: every
    "round up" is ``(a + b - 1) / b`` in integers, a quantity over a per-tenant limit bills
    ``⌈(ΣQ − limit·N) / (limit·N)⌉``, the minimum charge applies when every standard line is
    0 and service metrics or monitors were used or there is no micro unit.
    """
    n = int(hours_in_month)
    c = catalog

    def ceil(a: str, b: int) -> str:
        return f"(({a}) + {b - 1}) / {b}"

    def over(q: str, limit: int) -> str:
        cap = limit * n
        return f"CASE WHEN {q} > {cap} THEN {ceil(f'{q} - {cap}', cap)} ELSE 0 END"

    standard = " + ".join([
        ceil("t.s", n), ceil("t.os", c.standard_host_metrics * n),
        over("t.sm", c.service_metrics), over("t.x", c.external_monitors),
        "COALESCE(r.units, 0)",
    ])
    micro = f"{ceil('t.u', n)} + {ceil('t.ou', c.micro_host_metrics * n)}"
    gross = (f"{c.standard_unit_price} * (b.std + CASE WHEN b.std = 0 AND (b.sm > 0 OR b.x > 0 "
             f"OR b.micro = 0) THEN {c.minimum_standard_units} ELSE 0 END) "
             f"+ {c.micro_unit_price} * b.micro")
    rate = c.tax_rate
    total = gross if c.prices_include_tax else (
        f"({gross}) + (({gross}) * {rate.numerator}) / {rate.denominator}")
    paid = "CASE WHEN plan = 'standard' THEN {} ELSE 0 END"
    return f"""
WITH t AS (
  SELECT tenant_id, SUM({paid.format(1)}) AS paid, SUM({paid.format('standard_hosts')}) AS s,
         SUM({paid.format('micro_hosts')}) AS u, SUM({paid.format('standard_overage')}) AS os,
         SUM({paid.format('micro_overage')}) AS ou, SUM({paid.format('service_metrics')}) AS sm,
         SUM({paid.format('monitors')}) AS x
  FROM usage_snapshots WHERE hour >= :start AND hour < :end GROUP BY tenant_id
), r AS (
  SELECT tenant_id, SUM({ceil('hosts', c.anomaly_detection_hosts_per_unit * n)}) AS units
  FROM (SELECT ur.tenant_id, ur.role, SUM(ur.hosts) AS hosts
        FROM usage_snapshot_roles ur
        JOIN usage_snapshots us ON us.tenant_id = ur.tenant_id AND us.hour = ur.hour
        WHERE ur.hour >= :start AND ur.hour < :end AND us.plan = 'standard'
        GROUP BY ur.tenant_id, ur.role) per_role
  GROUP BY tenant_id
), b AS (
  SELECT {standard} AS std, {micro} AS micro, t.sm, t.x
  FROM t LEFT JOIN r ON r.tenant_id = t.tenant_id WHERE t.paid > 0
)
SELECT COUNT(*), COALESCE(SUM({total}), 0) FROM b"""


def invoice_totals_check(engine: Engine, period: str, start: datetime, end: datetime) -> Check:
    """The current revisions' totals add up to :func:`expected_totals_sql` over the month."""
    catalog = catalog_for(period)
    n = int((end - start) / HOUR)
    sql = expected_totals_sql(catalog, n)
    inv = billing_invoices
    stmt = sa.text(sql).bindparams(sa.bindparam("start", type_=UTCDateTime),
                                   sa.bindparam("end", type_=UTCDateTime))
    with engine.connect() as conn:
        expected_count, expected = conn.execute(stmt, {"start": start, "end": end}).one()
        count, total = conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(inv.c.total), 0))
            .where(inv.c.period == period, inv.c.status != "void")
        ).one()
        conn.rollback()
    ok = int(total) == int(expected) and int(count) == int(expected_count)
    return Check(name="invoice_totals_equal_snapshot_sql", ok=ok,
                 details={"invoice_total_sum": int(total), "invoices": int(count),
                          "expected_total_sum": int(expected),
                          "expected_invoices": int(expected_count),
                          "catalog": catalog.version, "hours_in_month": n,
                          "sql": " ".join(sql.split())})


def hot_path_checks(
    engine: Engine, client: Any, *, tenant_prefix: str, hour: datetime, tenants: list[str],
    host_hours: int, host_metrics: int, posts: int, flushed_posts: int,
) -> list[Check]:
    """After the hot path's flush: the database holds, for ``hour`` and the tenants whose key
    starts with ``tenant_prefix``, exactly the ``host_hours`` rows and the ``host_metrics``
    distinct names (summed ``metric_count``) that were posted, and the flush counted the
    ``posts`` sent; Redis (``client``) holds none of the tenants' keys of that hour (released)."""
    from metering.hotpath import hour_keys

    hh, t = m.host_hours, m.tenants
    prefix = sa.func.substr(t.c.key, 1, len(tenant_prefix)) == tenant_prefix
    with engine.connect() as conn:
        rows, metrics = conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(hh.c.metric_count), 0))
            .select_from(hh.join(t, t.c.id == hh.c.tenant_id))
            .where(prefix, hh.c.hour == hour)
        ).one()
        conn.rollback()
    epoch_hour = int(hour.timestamp()) // 3600
    keys = [key for tenant in tenants for key in hour_keys(tenant, "host", epoch_hour)[1:]]
    keys += [hour_keys(tenant, "service", epoch_hour)[1] for tenant in tenants]
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.exists(key)
        left = sum(int(n) for n in pipe.execute())
    as_posted = (int(rows) == host_hours and int(metrics) == host_metrics
                 and flushed_posts == posts)
    return [
        Check(name="hot_path_flushed_as_posted", ok=as_posted,
              details={"hour": hour.isoformat(), "host_hours_posted": host_hours,
                       "host_hours_in_database": int(rows), "metrics_posted": host_metrics,
                       "metrics_in_database": int(metrics), "posts_sent": posts,
                       "posts_flushed": flushed_posts}),
        Check(name="hot_path_hours_released", ok=left == 0,
              details={"tenant_hours": len(tenants), "keys_left_in_redis": left}),
    ]
