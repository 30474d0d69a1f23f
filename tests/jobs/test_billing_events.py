"""``close-billing-period``'s per-item events: one ``tenant_billed`` line per tenant rated, on
both backends, through the job body and the production logging configuration."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy.engine import Engine

from billing import repository as repo
from billing.catalog import catalog_for
from billing.service import BillingOutcome, TenantOutcome, limits_for
from jobs import billing_jobs
from jobs.runtime.context import JobContext, JobResult, run_job
from jobs.runtime.logconfig import configure_logging
from metering.ingest import UsageRecorder
from metering.records import HostPost, PlanChange, Record
from metering.settings import Settings
from metering.snapshot import snapshot_hours
from metering.timeutil import hours_between, month_bounds

JOB = "close-billing-period"
PERIOD = "2026-02"  # 28 days: quick
ZONE = Settings().zone
START, END = month_bounds(PERIOD, ZONE)
AFTER = END + timedelta(hours=3)
FIELDS = {"tenant", "period", "std_units", "micro_units", "amount", "status"}
RUN_FIELDS = {"timestamp", "level", "event", "job", "run_id", "logical_time"}


def fleet(tenant: str, hosts: int, *, kind: str = "standard", plan: str = "standard"
          ) -> list[Record]:
    recs: list[Record] = [PlanChange(tenant=tenant, plan=plan, at=START)]
    for h in hours_between(START, END):
        recs += [HostPost(tenant=tenant, host=f"{tenant}-{kind}-{i}", kind=kind,
                          at=h + timedelta(minutes=1), metrics=("cpu", "mem"))
                 for i in range(hosts)]
    return recs


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[Path]:
    path = configure_logging(str(tmp_path / "logs"), stream=io.StringIO())
    assert path is not None
    structlog.contextvars.clear_contextvars()
    yield path
    configure_logging(None, stream=io.StringIO())


def run(engine: Engine, db_url: str, body: str, **options: Any) -> JobResult:
    ctx = JobContext(engine=engine, settings=Settings(database_url=db_url),
                     clock=lambda: datetime(2026, 3, 1, 3, tzinfo=UTC))
    result = run_job(JOB, getattr(billing_jobs, body), ctx, AFTER, period=PERIOD, **options)
    assert result.ok, result.error
    return result


def billed(path: Path, result: JobResult) -> list[dict[str, Any]]:
    """The item fields of ``result``'s ``tenant_billed`` lines, checked for their run fields."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        e = json.loads(line)
        if e["event"] != "tenant_billed" or e["run_id"] != result.run_id:
            continue
        assert e.keys() == FIELDS | RUN_FIELDS, e
        assert (e["level"], e["job"], e["logical_time"]) == ("info", JOB, AFTER.isoformat())
        out.append({k: e[k] for k in FIELDS})
    return out


def line(tenant: str, std: int, amount: str, status: str, micro: int = 0) -> dict[str, Any]:
    return {"tenant": tenant, "period": PERIOD, "std_units": std, "micro_units": micro,
            "amount": amount, "status": status}


def test_a_line_per_tenant_billed_through_close_rerun_and_finalize(
        engine: Engine, db_url: str, logs: Path) -> None:
    recorder = UsageRecorder(engine)
    recorder.record(fleet("paying", 3) + fleet("tiny", 2, kind="micro")
                    + fleet("freebie", 2, plan="free"))

    closed = run(engine, db_url, "close")
    with engine.connect() as conn:
        tiny = repo.load_invoices(conn, PERIOD)["tiny"][0]
    assert billed(logs, closed) == [  # a free tenant is not billed
        line("paying", 3, "5499", "created"),
        line("tiny", tiny.standard_units, str(tiny.total), "created", tiny.micro_units),
    ]
    assert tiny.micro_units > 0

    again = run(engine, db_url, "close")
    assert [(b["tenant"], b["amount"], b["status"]) for b in billed(logs, again)] == [
        ("paying", "5499", "unchanged"), ("tiny", str(tiny.total), "unchanged")]

    recorder.record(fleet("paying", 4))  # a fourth host all month, snapshotted again
    hours = list(hours_between(START, END))
    with engine.begin() as conn:
        for i in range(0, len(hours), 24):
            snapshot_hours(conn, hours[i:i + 24], limits=limits_for(catalog_for(PERIOD)),
                           run_id="late", snapshotted_at=AFTER)
    stale = run(engine, db_url, "close")  # a close does not revise: the invoice stands
    assert billed(logs, stale)[0] == line("paying", 3, "5499", "stale")

    revised = run(engine, db_url, "rerun", reason="fourth host")
    assert billed(logs, revised)[0] == line("paying", 4, "7332", "revised")

    run(engine, db_url, "finalize")
    recorder.record(fleet("paying", 5))
    adjusted = run(engine, db_url, "rerun", reason="fifth host")
    assert billed(logs, adjusted)[0] == line("paying", 5, "9165", "adjusted")

    dry = run(engine, db_url, "rerun", dry_run=True)  # bills no one: no lines
    assert billed(logs, dry) == []
    assert closed.counts["tenants_processed"] == len(billed(logs, closed))


def test_a_failed_tenant_gets_no_billed_line() -> None:
    new = {"standard_units": 1, "micro_units": 0, "total": 1833, "tax": 166}
    outcome = BillingOutcome(
        period=PERIOD, action="close", dry_run=False, run_id="r", catalog="2019-10",
        hours_in_month=672,
        tenants=(TenantOutcome(tenant="good", action="created", revision=1, new=new),
                 TenantOutcome(tenant="bad", action="failed", error="boom")))
    structlog.contextvars.clear_contextvars()
    with structlog.testing.capture_logs() as events:
        billing_jobs._log_billed(outcome)
    assert events == [{"event": "tenant_billed", "log_level": "info", "tenant": "good",
                       "period": PERIOD, "std_units": 1, "micro_units": 0, "amount": "1833",
                       "status": "created"}]
