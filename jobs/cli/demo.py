"""``hostmeter demo``: the main job end to end on a synthetic fleet (:mod:`jobs.synthetic.demo`)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING

import click

from jobs.cli.errors import fail
from jobs.cli.state import current_state
from metering.display import quote_name

if TYPE_CHECKING:
    from jobs.runtime.context import JobContext

__all__ = ["demo"]


def _avg(total: int, hours: int) -> str:
    """An hour sum's monthly average, for display only (billing keeps the exact fraction)."""
    return str((Decimal(total) / Decimal(hours)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


@click.command()
@click.option("--seed", type=int, default=1, show_default=True, help="Another seed, another fleet.")
@click.option("--period", metavar="YYYY-MM",
              help="Month to generate (default: the previous full month in the billing zone).")
@click.option("--tenants", type=click.IntRange(12, 5000), default=36, show_default=True)
def demo(seed: int, period: str | None, tenants: int) -> None:
    """Generate a synthetic fleet, snapshot a month of hours, close it, print invoices; then
    estimate the current month and deliver one budget alert to a local webhook receiver."""
    from jobs.cli.billing import print_invoices
    from jobs.cli.console import out, print_table, progress
    from jobs.runtime.context import JobContext
    from jobs.synthetic.demo import run_demo
    from metering import db
    from metering.timeutil import month_bounds, previous_period

    state = current_state()
    settings = state.settings
    period = period or previous_period(datetime.now(UTC), settings.zone)
    month_bounds(period, settings.zone)  # validates the period before touching the database
    engine = state.engine()
    out.print(f"hostmeter demo: {tenants} tenants, period {period} ({settings.billing_tz}), "
              f"database {db.redact_url(settings.database_url)}", markup=False)
    with (
        progress("record usage", tenants) as ingest_update,
        progress("snapshot hours", None) as snap_update,
    ):
        ctx = JobContext(engine=engine, settings=settings, trigger="manual",
                         progress=snap_update)
        result = run_demo(ctx, period, seed=seed, tenants=tenants, ingest_progress=ingest_update)
    ctx = JobContext(engine=engine, settings=settings, trigger="manual")
    n = result.hours_in_month
    shapes = {t.key: t.shape for t in result.fleet}
    rows = []
    for u in result.usage:
        rows.append([
            u.tenant, shapes.get(u.tenant, ""), u.main_plan, u.standard_hours,
            _avg(u.standard_host_hours, n), _avg(u.micro_host_hours, n),
            _avg(u.standard_overage, n), _avg(u.micro_overage, n),
            _avg(u.service_metrics, n), _avg(u.monitors, n),
        ])
    print_table(
        f"usage {period}: averages over all {n} hours of the month",
        ["tenant", "shape", "plan", "paid h", "std hosts", "micro hosts", "std overage",
         "micro overage", "svc metrics", "monitors"],
        rows,
        right=["paid h", "std hosts", "micro hosts", "std overage", "micro overage",
               "svc metrics", "monitors"],
    )
    s = result.ingest
    out.print(
        f"recorded {s.records} records ({s.written_rows} rows written) for {s.tenants} "
        f"tenants, {s.hosts} hosts; snapshotted {result.snapshot.counts.get('hours', 0)} "
        f"hours in {result.snapshot.duration_s:.1f}s; coverage {result.covered_hours}/{n} hours",
        markup=False,
    )
    if not result.snapshot.ok:
        fail(f"snapshot-usage {result.snapshot.status}: {result.snapshot.error}")
    print_invoices(period, result.invoices)
    if result.billing is not None:
        c = result.billing.counts()
        out.print(
            f"close-billing-period {result.close.status}: {c['invoices_written']} invoice(s) "
            f"written, {c['unchanged']} unchanged; see `hostmeter billing show --period "
            f"{period} --format json` for every line and its basis", markup=False)
        for tenant, hosts in result.billing.free_over_limit:
            out.print("free plan over its host limit (reported, not invoiced): "
                      f"{quote_name(tenant)} (up to {hosts} hosts)", markup=False)
    if not result.close.ok:
        fail(f"close-billing-period {result.close.status}: {result.close.error}")
    _notices(ctx, seed=seed, tenants=tenants)


def _notices(ctx: JobContext, *, seed: int, tenants: int) -> None:
    """The current month: estimates, one budget alert, its webhook delivered locally."""
    from billing.alerts import decimal_text
    from billing.rules import format_money
    from jobs.cli.console import out
    from jobs.cli.usage import print_estimates
    from jobs.synthetic.demo import run_demo_notices

    now = datetime.now(UTC)
    with out.status("current month: record, snapshot, estimate, alert, deliver"):
        notes = run_demo_notices(ctx, now, seed=seed, tenants=tenants)
    for job in (notes.snapshot, notes.estimate, notes.delivery):
        if not job.ok:
            fail(f"{job.job} {job.status}: {job.error}")
    print_estimates(notes.estimates, period=notes.period, as_of=notes.as_of,
                    zone=ctx.settings.zone, missing=notes.hours_missing)
    alert = notes.alert
    if alert is None:
        out.print(f"no budget alert set: {quote_name(notes.tenant)} has no projected amount "
                  f"in {notes.period} yet", markup=False)
        return
    state = alert.alert
    currency = notes.estimates[0].mtd.currency if notes.estimates else ""
    projected = next((e.projected for e in notes.estimates if e.tenant == notes.tenant), None)
    shown = (f"{format_money(projected.total, projected.minor_units)} {currency}"
             if projected is not None else "none")
    out.print(f"budget alert: {quote_name(notes.tenant)} projected amount >= "
              f"{decimal_text(state.threshold)} {currency} (projected {shown}); webhook endpoint "
              f"{notes.endpoint_url} (started for this demo, removed after)", markup=False)
    sent = [r for r in notes.received if r.event_type == "usage.threshold"]
    for r in sent:
        verdict = "signature verified" if r.signature_valid else "SIGNATURE INVALID"
        out.print(f"delivered {r.event_type} {r.event_id} to {notes.endpoint_url}: HTTP "
                  f"{r.answered}, {verdict}", markup=False)
    if not sent:
        out.print("no new event: this alert already crossed this month (one event per "
                  "crossing; `hostmeter webhooks list` shows its delivery)", markup=False)
