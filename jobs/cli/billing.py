"""``hostmeter billing close|rerun|finalize|show``: the operator's view of a billing period."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from jobs.cli.console import print_line, print_table
from jobs.cli.errors import EXIT_FAILED, Group, fail, raise_known
from jobs.cli.state import current_state, parse_at
from metering.display import quote_name
from metering.timeutil import month_bounds

if TYPE_CHECKING:  # the billing code is imported by the commands that run it
    from billing.repository import StoredInvoice
    from billing.service import BillingOutcome

__all__ = ["billing_group"]


@click.group("billing", cls=Group)
def billing_group() -> None:
    """Close, rerun, finalize and show a billing period (a calendar month in
    HOSTMETER_BILLING_TZ).

    \b
    Lifecycle: close → draft revision 1 per paying tenant; rerun → new revisions
    where usage changed (a final invoice is never changed: a new draft revision
    carries an adjustment); finalize → drafts become final.
    """


def _period_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--period", required=True, metavar="YYYY-MM",
                        help="Billing month, e.g. 2026-10.")(f)


def _tenant_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--tenant", "tenants", multiple=True, metavar="ID",
                        help="Only this tenant (repeatable).")(f)


def _format_option(*choices: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--format", "fmt", type=click.Choice(list(choices)), default=choices[0],
                        show_default=True)


def _run(name: str, body: str, period: str, *, at: str | None, fmt: str,
         **options: Any) -> BillingOutcome:
    """Run ``jobs.billing_jobs.<body>`` for ``period`` under job telemetry and print it."""
    from jobs import billing_jobs
    from jobs.runtime.context import JobContext, run_job

    state = current_state()
    month_bounds(period, state.settings.zone)  # a bad period fails before any work
    engine = state.engine()
    ctx = JobContext(engine=engine, settings=state.settings, trigger="manual")
    sink: list[BillingOutcome] = []
    result = run_job(name, getattr(billing_jobs, body), ctx, parse_at(at), period=period,
                     outcomes=sink, **options)
    raise_known(result.exception)
    if result.exception is not None:
        fail(f"{name} failed: {result.error}", EXIT_FAILED)
    outcome = sink[0]
    _print_outcome(outcome, fmt)
    if outcome.failed:
        fail(f"{name} {period} partial: {len(outcome.failed)} tenant(s) failed "
             f"({', '.join(quote_name(t.tenant) for t in outcome.failed[:5])}"
             f"{', …' if len(outcome.failed) > 5 else ''}); run it again to finish",
             EXIT_FAILED)
    return outcome


def _money(v: dict[str, Any] | None, key: str) -> str:
    return "" if v is None else str(v[key])


def _print_outcome(o: BillingOutcome, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps({
            "period": o.period, "action": o.action, "dry_run": o.dry_run, "run_id": o.run_id,
            "catalog": o.catalog, "status": o.status, **o.counts(),
            "tenants": [
                {"tenant": t.tenant, "action": t.action, "revision": t.revision,
                 "old": t.old, "new": t.new, "difference": (
                     t.new["total"] - t.old["total"] if t.new and t.old else None),
                 "adjustment": t.adjustment, "error": t.error}
                for t in o.tenants
            ],
            "free_over_limit": [{"tenant": k, "hosts": h} for k, h in o.free_over_limit],
        }))
        return
    if o.action == "finalize":
        print_line(f"finalized {o.finalized} invoice(s) for {o.period}"
                   + (" (dry run: nothing written)" if o.dry_run else ""))
        return
    shown = [t for t in o.tenants if t.action != "unchanged"] if o.action != "close" \
        else list(o.tenants)
    rows = []
    for t in shown:
        diff = ""
        if t.old and t.new:
            diff = f"{t.new['total'] - t.old['total']:+d}"
        rows.append([
            t.tenant, t.action, t.revision,
            f"{_money(t.old, 'standard_units')}/{_money(t.old, 'micro_units')}" if t.old else "",
            f"{_money(t.new, 'standard_units')}/{_money(t.new, 'micro_units')}" if t.new else "",
            _money(t.old, "total"), _money(t.new, "total"), diff, t.error or "",
        ])
    title = (f"billing {o.action} {o.period} (catalog {o.catalog})"
             + (" — DRY RUN, nothing written" if o.dry_run else ""))
    print_table(title, ["tenant", "action", "rev", "old std/micro", "new std/micro",
                        "old total", "new total", "difference", "error"], rows,
                right=["rev", "old total", "new total", "difference"])
    c = o.counts()
    print_line(
        f"{c['invoices_written']} written, {c['unchanged']} unchanged, {c['stale']} stale, "
        f"{c['tenants_failed']} failed; {o.rebuilt_hours} hour(s) snapshotted from recorded "
        "usage")
    if c["stale"]:
        print_line("stale: usage changed since these invoices were written; run "
                   f"`hostmeter billing rerun --period {o.period}` to revise them")
    for tenant, hosts in o.free_over_limit:
        print_line(f"free plan over its host limit (not invoiced): {quote_name(tenant)} with up "
                   f"to {hosts} hosts", stderr=True)


@billing_group.command("close")
@_period_option
@_tenant_option
@click.option("--dry-run", is_flag=True, help="Compute and show; write nothing.")
@click.option("--at", metavar="ISO8601",
              help="Logical time (default now): hours after it cannot be rebuilt.")
@_format_option("table", "json")
def close_cmd(period: str, tenants: tuple[str, ...], dry_run: bool, at: str | None,
              fmt: str) -> None:
    """Close a month: snapshot any missing hour, draft revision 1 per paying tenant.

    Closing again writes nothing; a tenant whose usage changed since its invoice
    was written is listed as stale (use `billing rerun`).
    """
    _run("close-billing-period", "close", period, at=at, fmt=fmt, tenants=tenants,
         dry_run=dry_run)


@billing_group.command("rerun")
@_period_option
@_tenant_option
@click.option("--dry-run", is_flag=True,
              help="Show old and new units and amounts per tenant; write nothing.")
@click.option("--reason", metavar="TEXT",
              help="Why (recorded; required when a final invoice gets an adjustment).")
@click.option("--at", metavar="ISO8601", help="Logical time (default now).")
@_format_option("table", "json")
def rerun_cmd(period: str, tenants: tuple[str, ...], dry_run: bool, reason: str | None,
              at: str | None, fmt: str) -> None:
    """Re-snapshot the month from recorded usage and recompute its invoices.

    \b
    unchanged        nothing is written
    changed draft    revision n+1 (draft); revision n becomes void
    changed final    the final invoice stays as it is; a new draft revision
                     carries an adjustment of exactly the difference
    """
    _run("close-billing-period", "rerun", period, at=at, fmt=fmt, tenants=tenants,
         dry_run=dry_run, reason=reason)


@billing_group.command("finalize")
@_period_option
@_tenant_option
@click.option("--dry-run", is_flag=True, help="Count what would be finalized; write nothing.")
@_format_option("table", "json")
def finalize_cmd(period: str, tenants: tuple[str, ...], dry_run: bool, fmt: str) -> None:
    """Make the period's draft invoices final. Final invoices never change again."""
    _run("finalize-invoices", "finalize", period, at=None, fmt=fmt, tenants=tenants,
         dry_run=dry_run)


@billing_group.command("show")
@_period_option
@_tenant_option
@_format_option("table", "json", "csv")
def show_cmd(period: str, tenants: tuple[str, ...], fmt: str) -> None:
    """Show every revision of the period's invoices (with lines and adjustments)."""
    from billing import repository as repo
    from billing.documents import CSV_COLUMNS, csv_rows, period_document
    from metering.db import reading

    state = current_state()
    month_bounds(period, state.settings.zone)
    engine = state.engine()
    with reading(engine) as conn:
        ids = list(repo.resolve_tenants(conn, tenants).values()) if tenants else None
        stored = repo.load_invoices(conn, period, ids)
    invoices = [inv for key in sorted(stored) for inv in stored[key]]
    if fmt == "json":
        click.echo(json.dumps(period_document(period, invoices), ensure_ascii=False))
        return
    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(csv_rows(period, invoices))
        return
    print_invoices(period, invoices)


def print_invoices(period: str, invoices: list[StoredInvoice]) -> None:
    from billing.rules import format_money

    rows = []
    for inv in invoices:
        adj = ""
        if inv.adjustments:
            a = inv.adjustments[0]
            adj = f"{format_money(a['amount'], inv.minor_units)} vs rev {a['adjusts_revision']}"
            if not adj.startswith("-"):
                adj = "+" + adj
        rows.append([inv.tenant, inv.revision, inv.status, inv.standard_units, inv.micro_units,
                     format_money(inv.total, inv.minor_units),
                     format_money(inv.tax, inv.minor_units), inv.currency, adj])
    if not rows:
        print_line(f"no invoices for {period}")
        return
    print_table(f"invoices {period}", ["tenant", "rev", "status", "std units", "micro units",
                                        "total", "tax", "cur", "adjustment"], rows,
                right=["rev", "std units", "micro units", "total", "tax"])


