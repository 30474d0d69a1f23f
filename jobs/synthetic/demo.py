"""``hostmeter demo``: the main job end to end on the embedded default.

Generates the deterministic synthetic fleet for one month, records it through the ingest API,
snapshots every hour of the month (a backfill of ``snapshot-usage``), closes the month
(``close-billing-period``) and returns the per-tenant usage summary and the invoices. Running it
again records nothing new (ingest is idempotent), reproduces the same snapshots and writes no new
invoice revision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from billing.repository import StoredInvoice, load_invoices
from billing.service import BillingOutcome
from jobs import billing_jobs, snapshot_usage
from jobs.runtime.context import JobContext, JobResult, new_run_id, run_job
from jobs.synthetic.fleet import FleetTenant, demo_fleet
from metering.db import reading
from metering.ingest import IngestSummary, UsageRecorder
from metering.records import Record
from metering.report import TenantMonth, coverage, month_usage
from metering.timeutil import month_bounds

__all__ = ["DemoResult", "run_demo"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoResult:
    """What the demo did, for printing."""

    period: str
    start: datetime
    end: datetime
    hours_in_month: int
    covered_hours: int
    fleet: list[FleetTenant]
    ingest: IngestSummary
    snapshot: JobResult
    usage: list[TenantMonth]
    close: JobResult
    billing: BillingOutcome | None
    invoices: list[StoredInvoice]


def run_demo(
    ctx: JobContext,
    period: str,
    *,
    seed: int = 1,
    tenants: int = 36,
    ingest_progress: Callable[[int, int | None], None] | None = None,
) -> DemoResult:
    zone = ctx.settings.zone
    start, end = month_bounds(period, zone)
    fleet = demo_fleet(period, zone, seed=seed, tenants=tenants)

    def records() -> Iterator[Record]:
        for i, tenant in enumerate(fleet, start=1):
            yield from tenant.records(zone)
            if ingest_progress is not None:
                ingest_progress(i, len(fleet))

    summary = UsageRecorder(ctx.engine, batch_size=20_000).record(records())
    hours = snapshot_usage.backfill_hours(start, end)
    result = run_job(
        "snapshot-usage", snapshot_usage.run, ctx, start, hours=hours
    )
    outcomes: list[BillingOutcome] = []
    closed = run_job("close-billing-period", billing_jobs.close,
                     dataclasses.replace(ctx, run_id=new_run_id()), end, period=period,
                     outcomes=outcomes)
    with reading(ctx.engine) as conn:
        usage = month_usage(conn, start, end)
        covered = coverage(conn, start, end)
        stored = load_invoices(conn, period)
    return DemoResult(
        period=period, start=start, end=end, hours_in_month=len(hours), covered_hours=covered,
        fleet=fleet, ingest=summary, snapshot=result, usage=usage, close=closed,
        billing=outcomes[0] if outcomes else None,
        invoices=[inv for key in sorted(stored) for inv in stored[key]],
    )
