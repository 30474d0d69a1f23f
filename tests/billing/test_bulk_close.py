"""The close writes in bulk: the same invoices, lines and adjustments as writing one tenant at a
time, with one savepoint when nothing fails and a few more to isolate a tenant that does; and the
bench's check that invoice totals equal one plain SQL statement over the snapshots."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from billing import models as bm
from billing import repository as repo
from billing.catalog import Catalog, catalog_for
from billing.rules import MonthSums, Rating, rate
from billing.service import BillingRequest, close_period, finalize_period, rerun_period
from jobs.synthetic.bench.checks import invoice_totals_check
from jobs.synthetic.fleet import demo_fleet
from metering import models as m
from metering.ingest import UsageRecorder
from metering.records import HostPost, PlanChange, Record
from metering.settings import Settings
from metering.timeutil import HOUR, month_bounds

ZONE = Settings().zone
PERIOD = "2026-02"  # 28 days
START, END = month_bounds(PERIOD, ZONE)
N = int((END - START) / HOUR)
NOW = datetime(2026, 3, 1, tzinfo=UTC)


def request(**kw: Any) -> BillingRequest:
    base: dict[str, Any] = dict(period=PERIOD, zone=ZONE, logical_time=END + timedelta(hours=3),
                                actor="ops@billing-1", run_id=f"r-{datetime.now().timestamp()}",
                                now=NOW)
    base.update(kw)
    return BillingRequest(**base)


def few_hours(tenant: str, hosts: int) -> list[Record]:
    """``hosts`` standard hosts in the first 24 hours of the month (snapshots stay small)."""
    recs: list[Record] = [PlanChange(tenant=tenant, plan="standard", at=START)]
    for i in range(24):
        for j in range(hosts):
            recs.append(HostPost(tenant=tenant, host=f"{tenant}-{j}", kind="standard",
                                 at=START + i * HOUR + timedelta(minutes=2),
                                 metrics=("cpu", "mem")))
    return recs


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    from metering import db

    eng = db.create_engine(db_url)
    yield eng
    eng.dispose()


def written(engine: Engine) -> dict[str, Any]:
    """Invoices, lines and adjustments keyed by (tenant, revision), ids left out."""
    inv, ln, adj, t = bm.invoices, bm.invoice_lines, bm.invoice_adjustments, m.tenants
    with engine.connect() as conn:
        keys = {r.id: (r.key, r.revision) for r in conn.execute(
            sa.select(inv.c.id, inv.c.revision, t.c.key).join(t, t.c.id == inv.c.tenant_id))}
        invoices = {keys[r["id"]]: {k: v for k, v in r.items() if k not in ("id", "run_id")}
                    for r in conn.execute(sa.select(inv)).mappings()}
        lines = sorted((keys[r["invoice_id"]], r["position"], r["item"], r["unit"], r["units"],
                        r["unit_price"], r["amount"], repr(sorted(r["basis"].items())))
                       for r in conn.execute(sa.select(ln)).mappings())
        adjustments = sorted((keys[r["invoice_id"]], keys[r["adjusts_invoice_id"]],
                              r["standard_units"], r["micro_units"], r["tax"], r["amount"],
                              r["reason"]) for r in conn.execute(sa.select(adj)).mappings())
    return {"invoices": invoices, "lines": lines, "adjustments": adjustments}


def one_at_a_time(engine: Engine, catalog: Catalog) -> None:
    """The close as it is defined: rate each paying tenant and insert its revision alone."""
    with engine.begin() as conn:
        ids = dict(conn.execute(sa.select(m.tenants.c.key, m.tenants.c.id)).all())
        sums = repo.month_sums(conn, START, END, N)
        for tenant in sorted(k for k, s in sums.items() if s.paid_hours > 0):
            repo.insert_revision(conn, tenant_id=ids[tenant], period=PERIOD, revision=1,
                                 rating=rate(sums[tenant], catalog), created_at=NOW,
                                 created_by="ops@billing-1", run_id="one-at-a-time",
                                 reason=None)


def drafts_deleted(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.delete(bm.invoice_lines))
        conn.execute(sa.delete(bm.invoices))


def savepoints(engine: Engine) -> list[str]:
    names: list[str] = []

    def on_savepoint(conn: Connection, name: str) -> None:
        names.append(name)

    event.listen(engine, "savepoint", on_savepoint)
    return names


def test_bulk_close_of_a_mixed_fleet_writes_what_one_tenant_at_a_time_writes(
    engine: Engine,
) -> None:
    fleet = demo_fleet(PERIOD, ZONE, seed=3, tenants=14)
    UsageRecorder(engine, batch_size=20_000).record(
        r for tenant in fleet for r in tenant.records(ZONE))
    used = savepoints(engine)
    out = close_period(engine, request())
    assert out.status == "succeeded" and out.count("created") >= 10
    assert len(used) == 1  # every invoice and line in one bulk write
    bulk = written(engine)
    lines = bulk["lines"]
    assert {item for _, _, item, *_ in lines} >= {
        "standard_hosts", "standard_host_metric_overage", "micro_hosts",
        "micro_host_metric_overage", "service_metric_overage", "external_monitor_overage",
        "anomaly_detection", "minimum_charge"}

    check = invoice_totals_check(engine, PERIOD, START, END)
    assert check.ok, check.details
    assert check.details["invoice_total_sum"] == sum(
        i["total"] for i in bulk["invoices"].values()) > 0

    drafts_deleted(engine)
    one_at_a_time(engine, catalog_for(PERIOD))
    reference = written(engine)
    for row in reference["invoices"].values():
        row["created_by"] = "ops@billing-1"
    assert bulk == reference


def test_invoice_totals_check_fails_when_a_total_is_tampered_with(engine: Engine) -> None:
    UsageRecorder(engine).record(few_hours("a", 2) + few_hours("b", 3))
    close_period(engine, request())
    assert invoice_totals_check(engine, PERIOD, START, END).ok
    with engine.begin() as conn:  # drafts may still change; this one by one yen
        conn.execute(sa.update(bm.invoices).where(bm.invoices.c.revision == 1,
                                                  bm.invoices.c.tenant_id == sa.select(
                                                      m.tenants.c.id).where(
                                                      m.tenants.c.key == "b").scalar_subquery())
                     .values(total=bm.invoices.c.total + 1))
    check = invoice_totals_check(engine, PERIOD, START, END)
    assert not check.ok
    assert check.details["invoice_total_sum"] == check.details["expected_total_sum"] + 1


def test_a_tenant_failing_in_the_database_is_isolated_and_the_rest_written_in_bulk(
    engine: Engine,
) -> None:
    tenants = [f"t-{i:02d}" for i in range(16)]
    UsageRecorder(engine).record([r for i, t in enumerate(tenants)
                                  for r in few_hours(t, 1 + i % 3)])

    def one_bad(sums: MonthSums, catalog: Catalog) -> Rating:
        r = rate(sums, catalog)
        if sums.tenant == "t-11":  # the invoice row violates NOT NULL
            return dataclasses.replace(r, currency=None)  # type: ignore[arg-type]
        return r

    used = savepoints(engine)
    out = close_period(engine, request(), rate_fn=one_bad)
    assert out.status == "partial"
    assert [t.tenant for t in out.failed] == ["t-11"]
    assert [t.tenant for t in out.tenants] == tenants
    # 1 for all 16, then halves down to the one: 1 + 2·log₂16 savepoints, not 16.
    assert len(used) == 1 + 2 * 4
    inv = written(engine)["invoices"]
    assert sorted(k for k, _ in inv) == [t for t in tenants if t != "t-11"]

    again = close_period(engine, request())
    assert [(t.tenant, t.action) for t in again.tenants if t.action != "unchanged"] == [
        ("t-11", "created")]


def test_rerun_voids_revises_and_adjusts_in_bulk(engine: Engine) -> None:
    recorder = UsageRecorder(engine)
    recorder.record(few_hours("draft-1", 1) + few_hours("draft-2", 1) + few_hours("final", 1)
                    + few_hours("same", 1))
    close_period(engine, request())
    finalize_period(engine, request(tenants=("final",)))
    recorder.record(few_hours("draft-1", 30) + few_hours("draft-2", 40) + few_hours("final", 50))
    used = savepoints(engine)
    out = rerun_period(engine, request(reason="late posts"))
    assert {t.tenant: t.action for t in out.tenants} == {
        "draft-1": "revised", "draft-2": "revised", "final": "adjusted", "same": "unchanged"}
    assert len(used) == 1
    rows = written(engine)
    status = {k: v["status"] for k, v in rows["invoices"].items()}
    assert status == {("draft-1", 1): "void", ("draft-1", 2): "draft", ("draft-2", 1): "void",
                      ("draft-2", 2): "draft", ("final", 1): "final", ("final", 2): "draft",
                      ("same", 1): "draft"}
    [adj] = rows["adjustments"]
    assert adj[:2] == (("final", 2), ("final", 1)) and adj[-1] == "late posts"
    assert adj[5] == rows["invoices"]["final", 2]["total"] - rows["invoices"]["final", 1]["total"]
