"""``estimate-usage`` as a job: at the month's last hour the estimate is the invoice the close
then writes (a generated fleet, every tenant); the window; rows stored, and replaced by a
rerun of the same hour; gaps counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from billing import estimate
from billing import notices as n
from billing.alerts import set_alert
from billing.repository import load_invoices
from jobs import billing_jobs, estimate_usage, snapshot_usage
from jobs.runtime.context import JobContext, JobResult, new_run_id, run_job
from jobs.synthetic.fleet import demo_fleet
from metering import models as m
from metering.db import reading
from metering.ingest import UsageRecorder
from metering.records import HostPost, PlanChange, Record
from metering.settings import Settings
from metering.timeutil import HOUR, hours_between, month_bounds

JOB = "estimate-usage"
PERIOD = "2026-10"
SETTINGS = Settings()
ZONE = SETTINGS.zone  # Asia/Tokyo
START, END = month_bounds(PERIOD, ZONE)
CLOCK = datetime(2026, 11, 1, 1, 0, tzinfo=UTC)


def local(day: int, hour: int = 0) -> datetime:
    return datetime(2026, 10, day, tzinfo=ZONE).astimezone(UTC) + hour * HOUR


def ctx_for(engine: Engine) -> JobContext:
    return JobContext(engine=engine, settings=SETTINGS, clock=lambda: CLOCK)


def run(engine: Engine, at: datetime) -> JobResult:
    result = run_job(JOB, estimate_usage.run, dataclasses.replace(ctx_for(engine),
                                                                  run_id=new_run_id()), at)
    assert result.status == "succeeded", result.error
    return result


@pytest.fixture
def hostmeter(db_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    env = {**os.environ, "HOSTMETER_DATABASE_URL": db_url,
           "HOSTMETER_LOG_DIR": str(tmp_path / "logs")}

    def call(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        return proc

    return call


def stored(engine: Engine, as_of: datetime | None = None) -> dict[str, dict[str, Any]]:
    ue, t = n.usage_estimates, m.tenants
    query = sa.select(ue, t.c.key).join(t, t.c.id == ue.c.tenant_id)
    if as_of is not None:
        query = query.where(ue.c.as_of == as_of)
    with engine.connect() as conn:
        return {f"{r['key']}@{r['as_of'].isoformat()}": dict(r)
                for r in conn.execute(query).mappings()}


# --- the key property: at the month's end the estimate is the invoice --------------------------


def test_estimate_at_the_month_end_equals_the_invoice_the_close_writes(
    engine: Engine, hostmeter: Any,
) -> None:
    """A generated fleet (worked examples, mid-month signup, trial → standard, free tenants,
    micro only, monitors only, autoscaling, anomaly roles, random tenants), every hour of
    October snapshotted. The estimate at the month's end — computed, stored by the hourly run
    at 00:15 on November 1st, and shown by `usage estimate` — equals, for every tenant, the
    invoice the close then writes: units, subtotal, tax, total, lines, content hash; and the
    tenants are the same."""
    fleet = demo_fleet(PERIOD, ZONE, seed=3, tenants=30)
    UsageRecorder(engine, batch_size=20_000).record(
        r for tenant in fleet for r in tenant.records(ZONE))
    snap = run_job("snapshot-usage", snapshot_usage.run, ctx_for(engine), START,
                   hours=snapshot_usage.backfill_hours(START, END))
    assert snap.status == "succeeded", snap.error

    with reading(engine) as conn:
        estimates = {e.tenant: e for e in estimate.compute(conn, period=PERIOD, as_of=END,
                                                           zone=ZONE)}
    ran = json.loads(hostmeter("run", JOB, "--at", (END + timedelta(minutes=15)).isoformat(),
                               "--format", "json").stdout)
    assert ran["status"] == "succeeded"
    shown = json.loads(hostmeter("usage", "estimate", "--at",
                                 (END + timedelta(minutes=15)).isoformat(),
                                 "--format", "json").stdout)
    rows = {k.split("@")[0]: r for k, r in stored(engine, END).items()}

    closed = run_job("close-billing-period", billing_jobs.close,
                     dataclasses.replace(ctx_for(engine), run_id=new_run_id()),
                     END + 3 * HOUR, period=PERIOD)
    assert closed.status == "succeeded", closed.error
    assert closed.counts["rebuilt_hours"] == 0
    with engine.connect() as conn:
        invoices = {k: revs[-1] for k, revs in load_invoices(conn, PERIOD).items()}

    assert len(invoices) >= 25
    assert set(estimates) == set(invoices) == set(rows)
    assert {t["tenant"] for t in shown["tenants"]} == set(invoices)
    assert ran["counts"]["tenants"] == len(invoices) and ran["counts"]["hours_missing"] == 0
    by_tenant = {t["tenant"]: t for t in shown["tenants"]}
    for key, inv in invoices.items():
        e = estimates[key]
        assert e.method == "complete" and e.hours_missing == 0
        for rating in (e.mtd, e.projected):
            assert (rating.standard_units, rating.micro_units, rating.subtotal, rating.tax,
                    rating.total, rating.catalog_version, rating.currency) == (
                inv.standard_units, inv.micro_units, inv.subtotal, inv.tax, inv.total,
                inv.catalog_version, inv.currency), key
            assert rating.content_hash == inv.content_hash, key
        assert [
            {"item": ln.item, "unit": ln.unit, "units": ln.units, "unit_price": ln.unit_price,
             "amount": ln.amount, "basis": ln.basis} for ln in e.mtd.lines
        ] == [{k: ln[k] for k in ("item", "unit", "units", "unit_price", "amount", "basis")}
              for ln in inv.lines], key
        row = rows[key]
        assert (row["mtd_standard_units"], row["mtd_micro_units"], row["mtd_total"],
                row["projected_standard_units"], row["projected_micro_units"],
                row["projected_total"], row["method"], row["hours_elapsed"]) == (
            inv.standard_units, inv.micro_units, inv.total, inv.standard_units,
            inv.micro_units, inv.total, "complete", 744), key
        assert (by_tenant[key]["mtd"]["total"], by_tenant[key]["projected"]["total"]) == (
            str(inv.total), str(inv.total))


# --- window, storing, rerun ---------------------------------------------------------------------


def _small_month(engine: Engine, until: datetime) -> None:
    """acme: two standard hosts every hour, a third from day 2 12:00; globex: one micro host
    (plan standard from day 2); tyrell: free. Posts up to ``until`` (and one after it)."""
    def posts() -> Iterator[Record]:
        yield PlanChange(tenant="acme", plan="standard", at=START)
        yield PlanChange(tenant="globex", plan="trial", at=START)
        yield PlanChange(tenant="globex", plan="standard", at=local(2))
        yield PlanChange(tenant="tyrell", plan="free", at=START)
        for h in hours_between(START, until + HOUR):
            at = h + timedelta(minutes=7)
            for host in ("a", "b") + (("c",) if h >= local(2, 12) else ()):
                yield HostPost(tenant="acme", host=host, kind="standard", at=at,
                               metrics=("loadavg5", "cpu.user"))
            yield HostPost(tenant="globex", host="m", kind="micro", at=at, metrics=("x",))
            yield HostPost(tenant="tyrell", host="f", kind="standard", at=at, metrics=("x",))
    UsageRecorder(engine).record(posts())


def _snapshot(engine: Engine, start: datetime, end: datetime) -> None:
    result = run_job("snapshot-usage", snapshot_usage.run, ctx_for(engine), start,
                     hours=snapshot_usage.backfill_hours(start, end))
    assert result.status == "succeeded", result.error


def _others(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every table the job must not change."""
    with engine.connect() as conn:
        return {t.name: sorted(map(tuple, conn.execute(sa.select(t))), key=repr)
                for t in (m.usage_snapshots, m.snapshot_hours, n.outbox_events,
                          n.budget_alert_states)}


def test_job_stores_one_row_per_paying_tenant_and_a_rerun_replaces_them(engine: Engine) -> None:
    as_of = local(3, 7)
    _small_month(engine, as_of)
    _snapshot(engine, START, as_of)
    others = _others(engine)
    with capture_logs() as logs:
        first = run(engine, as_of + timedelta(minutes=15))
    c = first.counts
    assert (c["period"], c["as_of"], c["method"], c["tenants"], c["rows_stored"],
            c["hours_missing"]) == (PERIOD, as_of.isoformat(), "last_day", 2, 2, 0)
    with engine.connect() as conn:
        expected = {e.tenant: e for e in estimate.compute(conn, period=PERIOD, as_of=as_of,
                                                          zone=ZONE)}
    assert c["projected_total"] == sum(e.projected.total for e in expected.values())
    assert c["mtd_total"] == sum(e.mtd.total for e in expected.values())
    assert any(k.startswith("alerts_") for k in c)
    [line] = [ev for ev in logs if ev["event"] == "estimate_usage"]
    assert line["tenants"] == 2 and line["projected_total"] == c["projected_total"]

    rows = stored(engine)
    assert sorted(rows) == [f"acme@{as_of.isoformat()}", f"globex@{as_of.isoformat()}"]
    acme = rows[f"acme@{as_of.isoformat()}"]
    e = expected["acme"]
    assert (acme["hours_elapsed"], acme["paid_hours"], acme["hours_in_month"],
            acme["mtd_standard_units"], acme["projected_standard_units"],
            acme["projected_total"], acme["method"], acme["run_id"], acme["computed_at"]) == (
        55, 55, 744, e.mtd.standard_units, e.projected.standard_units, e.projected.total,
        "last_day", first.run_id, CLOCK)
    # a third host from day 2 12:00 (19 hours so far); day 2 = 12·2 + 12·3 = 60 host-hours
    # carried 28 times, then the last 17 hours of day 2 (07:00–12:00 at 2 hosts, 12:00–24:00
    # at 3): 5·2 + 12·3 = 46
    assert e.projected_sums.standard_hosts == 2 * 55 + 19 + 28 * 60 + 46
    assert expected["globex"].paid_hours == 31  # standard from day 2 00:00

    second = run(engine, as_of + timedelta(minutes=40))
    again = stored(engine)
    assert sorted(again) == sorted(rows)
    for key, row in again.items():
        assert row["run_id"] == second.run_id
        assert {k: v for k, v in row.items() if k != "run_id"} == {
            k: v for k, v in rows[key].items() if k != "run_id"}
    assert _others(engine) == others

    # the next hour adds its own rows, the earlier ones stay (the dashboard's history)
    _snapshot(engine, as_of, as_of + HOUR)
    run(engine, as_of + HOUR + timedelta(minutes=15))
    assert len(stored(engine)) == 4


def test_gaps_are_counted_not_rebuilt(engine: Engine) -> None:
    as_of = local(2, 5)
    _small_month(engine, as_of)
    _snapshot(engine, START, local(1, 20))
    _snapshot(engine, local(1, 22), as_of)
    before = _others(engine)
    with capture_logs() as logs:
        result = run(engine, as_of + timedelta(minutes=15))
    assert result.counts["hours_missing"] == 2
    assert [ev["hours"] for ev in logs if ev["event"] == "estimate_hours_missing"] == [2]
    assert _others(engine) == before  # nothing snapshotted by the estimate


def test_the_run_after_midnight_on_the_first_estimates_the_month_that_ended(
    engine: Engine,
) -> None:
    _small_month(engine, END - HOUR)
    _snapshot(engine, local(31), END)
    result = run(engine, END + timedelta(minutes=15))
    assert (result.counts["period"], result.counts["as_of"], result.counts["method"]) == (
        PERIOD, END.isoformat(), "complete")
    assert result.counts["hours_missing"] == 720  # only the last day was snapshotted
    # an hour later it is November's first hour
    nov = run(engine, END + HOUR + timedelta(minutes=15))
    assert (nov.counts["period"], nov.counts["tenants"], nov.counts["method"]) == (
        "2026-11", 0, "hours_so_far")


def test_an_empty_database_stores_nothing(engine: Engine) -> None:
    result = run(engine, local(10, 3))
    assert (result.counts["tenants"], result.counts["rows_stored"]) == (0, 0)
    assert result.counts["hours_missing"] == 9 * 24 + 3
    assert stored(engine) == {}


def test_the_run_raises_a_threshold_event_once_in_its_transaction(engine: Engine) -> None:
    """acme's projection crosses its amount threshold: the hourly run raises one
    usage.threshold event; the next hour's run (still over) raises none."""
    as_of = local(3, 7)
    _small_month(engine, as_of + HOUR)
    _snapshot(engine, START, as_of + HOUR)
    with engine.begin() as conn:
        set_alert(conn, tenant="acme", measure="amount", threshold=Decimal(3000),
                  now=local(1, 1), actor="test", zone=ZONE)
    first = run(engine, as_of + timedelta(minutes=15)).counts
    assert (first["alerts_evaluated"], first["alerts_crossed"], first["alerts_cleared"]) == (
        1, 1, 0)
    second = run(engine, as_of + HOUR + timedelta(minutes=15)).counts
    assert (second["alerts_crossed"], second["alerts_cleared"]) == (0, 0)
    with engine.connect() as conn:
        events = conn.execute(sa.select(n.outbox_events.c.type)).scalars().all()
    assert events == ["usage.threshold"]
