"""The bench's snapshot and close beside their floors, and its invoice checks, over a whole (tiny)
month on every backend: the floors print their SQL, and the checks fail on a tampered invoice."""

from __future__ import annotations

import sqlalchemy as sa

from billing import models as bm
from jobs.synthetic.bench.checks import invoice_totals_check, invoices_check
from jobs.synthetic.bench.generate import generate_fleet
from jobs.synthetic.bench.measure import time_close, time_snapshots
from jobs.synthetic.bench.tiers import BenchTier
from metering.settings import Settings
from metering.timeutil import hours_between, month_bounds

PERIOD = "2026-02"  # 672 hours
MONTH = BenchTier(
    name="month", tenants=24, hosts=48, ingest_tenants=1, ingest_hosts_per_tenant=1,
    ingest_hours=1, ingest_posts_per_host_hour=1,
)


def test_snapshot_and_close_beside_their_floors_and_checked(bench_engine: sa.Engine) -> None:
    engine = bench_engine
    settings = Settings()
    start, end = month_bounds(PERIOD, settings.zone)
    hours = list(hours_between(start, end))
    generate_fleet(engine, MONTH, start, len(hours))

    snapshot = time_snapshots(engine, settings, hours).as_dict()
    assert snapshot["status"] == "succeeded"
    assert snapshot["floor_s"] > 0 and snapshot["floor_read_s"] > 0 and snapshot["ratio"] > 0
    assert snapshot["floor_rows"] > 0
    create, insert = snapshot["floor_sql"]
    assert create.startswith("CREATE TEMPORARY TABLE snapshot_floor_rows")
    assert insert.startswith("INSERT INTO snapshot_floor_rows SELECT")
    assert "FROM host_hours" in insert and "GROUP BY tenant_id, hour" in insert

    timing = time_close(engine, settings, PERIOD)
    close = timing.as_dict()
    assert close["status"] == "succeeded" and close["invoices_written"] > 0
    assert close["floor_s"] > 0 and close["floor_read_s"] > 0 and close["ratio"] > 0
    assert close["floor_rows"] >= close["invoices_written"]  # a row per tenant and plan
    assert [q.split(" ")[0] for q in close["floor_sql"]] == ["CREATE", "INSERT", "SELECT"]
    assert "FROM usage_snapshots" in close["floor_sql"][1]

    check = invoices_check(engine, PERIOD, start, end, timing)
    assert check.ok, check.details
    totals = check.details["totals"]
    assert totals["ok"] and totals["invoices"] == close["invoices_written"]
    assert totals["invoice_total_sum"] == totals["expected_total_sum"] > 0
    assert "FROM usage_snapshots" in totals["sql"]

    with engine.begin() as conn:  # one draft's total changed by one yen
        first = conn.execute(sa.select(sa.func.min(bm.invoices.c.id))).scalar_one()
        conn.execute(sa.update(bm.invoices).where(bm.invoices.c.id == first)
                     .values(total=bm.invoices.c.total - 1))
    assert not invoice_totals_check(engine, PERIOD, start, end).ok
    tampered = invoices_check(engine, PERIOD, start, end, timing)
    assert not tampered.ok
    assert tampered.details["paying_tenants"] == tampered.details["invoices"]  # still once each
