"""``hostmeter demo``: the main job end to end on the embedded default.

Generates the deterministic synthetic fleet for one month, records it through the ingest API,
snapshots every hour of the month (a backfill of ``snapshot-usage``), closes the month
(``close-billing-period``) and returns the per-tenant usage summary and the invoices. Running it
again records nothing new (ingest is idempotent), reproduces the same snapshots and writes no new
invoice revision.

Then :func:`run_demo_notices` shows what tenants hear before the close: the same fleet's current
month is recorded up to the last complete hour and snapshotted, a webhook endpoint pointing at a
receiver started on 127.0.0.1 (:mod:`jobs.synthetic.receiver`) and a budget alert under its
projection are set for one tenant, ``estimate-usage`` runs (the alert crosses: one
``usage.threshold`` event in the outbox) and ``deliver-webhooks`` sends it, signed, to the
receiver; the endpoint is removed when the receiver stops. Run again, the alert has already
crossed this month: nothing new is sent.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from billing import estimate
from billing.alerts import AlertSet, set_alert
from billing.estimate import TenantEstimate
from billing.repository import StoredInvoice, load_invoices, resolve_tenants
from billing.rules import to_decimal
from billing.service import BillingOutcome
from billing.webhooks import add_endpoint, list_endpoints, remove_endpoint
from jobs import billing_jobs, deliver_webhooks, estimate_usage, snapshot_usage
from jobs.runtime.context import JobContext, JobResult, new_run_id, run_job
from jobs.synthetic.fleet import FleetTenant, demo_fleet
from jobs.synthetic.receiver import Received, Receiver
from metering.db import reading
from metering.ingest import IngestSummary, UsageRecorder
from metering.records import Record
from metering.report import TenantMonth, coverage, month_usage
from metering.timeutil import floor_hour, month_bounds

__all__ = ["DemoNotices", "DemoResult", "run_demo", "run_demo_notices"]

DEMO_ACTOR = "hostmeter demo"


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


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoNotices:
    """The current month's estimates, the budget alert set on one tenant and what the local
    receiver got, for printing."""

    period: str
    as_of: datetime
    snapshot: JobResult
    estimates: list[TenantEstimate]
    hours_missing: int
    estimate: JobResult
    tenant: str
    alert: AlertSet | None
    delivery: JobResult
    endpoint_url: str
    received: list[Received]


def run_demo_notices(ctx: JobContext, now: datetime, *, seed: int = 1, tenants: int = 36,
                     tenant: str = "acme") -> DemoNotices:
    """Estimates for the month of the last complete hour before ``now``, one budget alert at
    80 % of ``tenant``'s projection, and its event delivered to a receiver on 127.0.0.1."""
    zone = ctx.settings.zone
    engine = ctx.engine
    as_of = floor_hour(now)
    period = estimate.period_at(as_of, zone)
    start, _ = month_bounds(period, zone)
    fleet = demo_fleet(period, zone, seed=seed, tenants=tenants)
    UsageRecorder(engine, batch_size=20_000).record(
        r for t in fleet for r in t.records(zone) if r.at < as_of)
    snapshot = run_job("snapshot-usage", snapshot_usage.run,
                       dataclasses.replace(ctx, run_id=new_run_id()), start,
                       hours=snapshot_usage.backfill_hours(start, as_of))
    with reading(engine) as conn:
        ids = resolve_tenants(conn, [tenant])
        preview = estimate.compute(conn, period=period, as_of=as_of, zone=zone,
                                   tenant_ids=list(ids.values()))
    secret = secrets.token_urlsafe(24)  # this run's endpoint only; never shown
    with Receiver(secret) as receiver:
        alert = None
        with engine.begin() as conn:
            for old in list_endpoints(conn, include_disabled=False):
                if old.created_by == DEMO_ACTOR:  # an earlier demo's receiver is gone
                    remove_endpoint(conn, old.id, now=now)
            endpoint = add_endpoint(conn, url=receiver.url, secret=secret, tenant=tenant,
                                    now=now, created_by=DEMO_ACTOR)
            if preview:
                p = preview[0].projected
                threshold = to_decimal(p.total * 8 // 10, p.minor_units)
                if threshold > 0:
                    alert = set_alert(conn, tenant=tenant, measure="amount",
                                      threshold=Decimal(threshold), now=now, actor=DEMO_ACTOR,
                                      zone=zone)
        estimated = run_job("estimate-usage", estimate_usage.run,
                            dataclasses.replace(ctx, run_id=new_run_id()), as_of)
        delivered = run_job("deliver-webhooks", deliver_webhooks.run,
                            dataclasses.replace(ctx, run_id=new_run_id()), now)
        received = list(receiver.received)
        with engine.begin() as conn:  # the receiver stops here: nothing more should go to it
            remove_endpoint(conn, endpoint.id, now=ctx.clock())
    with reading(engine) as conn:
        missing = estimate.hours_missing(conn, period=period, as_of=as_of, zone=zone)
        estimates = estimate.compute(conn, period=period, as_of=as_of, zone=zone,
                                     missing=missing)
    return DemoNotices(
        period=period, as_of=as_of, snapshot=snapshot, estimates=estimates,
        hours_missing=len(missing), estimate=estimated, tenant=tenant, alert=alert,
        delivery=delivered, endpoint_url=receiver.url, received=received,
    )
