"""``hostmeter alerts set|list|remove``: per-tenant budget thresholds on the projected month.

The rules (what counts as crossing, which events are sent when) are
:mod:`billing.alerts`'; this module parses, writes in one transaction, and prints.
``alerts set`` checks every threshold before it writes anything: a negative, zero or
non-numeric value, an amount with more decimals than the currency of the current period's
catalog has, or an unknown tenant is a one-line error (exit 2) and leaves the database as it
was.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING

import click

from jobs.cli.console import print_line, print_table
from jobs.cli.errors import EXIT_BAD_INPUT, Group, fail
from jobs.cli.state import current_state, parse_at
from metering.display import quote_name

if TYPE_CHECKING:  # the billing code is imported by the commands that run it
    from billing.alerts import Alert, AlertSet

__all__ = ["alerts_group"]

_OPTIONS = (("amount", "--amount"), ("standard_units", "--standard-units"),
            ("micro_units", "--micro-units"))


@click.group("alerts", cls=Group)
def alerts_group() -> None:
    """Budget alerts: a threshold per tenant on the projected amount or units; crossing it
    raises one usage.threshold event (delivered by webhook).

    \b
    Crossed means projected value ≥ threshold. One usage.threshold event per
    crossing, one usage.threshold_cleared when the projection falls back under
    (a rerun, a higher threshold); never one per hour. Setting or changing a
    threshold compares it at once with the tenant's latest estimate.
    """


def _when(t: datetime | None) -> str:
    return "" if t is None else t.strftime("%Y-%m-%d %H:%M UTC")


def _state(a: Alert) -> str:
    if a.period is None:
        return "no estimate yet"
    return f"crossed (#{a.crossings})" if a.crossed else "under"


def _value(a: Alert) -> str:
    from billing.alerts import decimal_text

    return "" if a.value is None else decimal_text(a.value)


@alerts_group.command("set")
@click.option("--tenant", required=True, metavar="ID", help="The tenant's key.")
@click.option("--amount", metavar="DECIMAL",
              help="Threshold on the projected invoice total, in currency units (50000 JPY).")
@click.option("--standard-units", metavar="N", help="Threshold on projected standard units.")
@click.option("--micro-units", metavar="N", help="Threshold on projected micro units.")
@click.option("--at", metavar="ISO8601",
              help="The instant it is set at (default now): it is compared with the latest "
              "estimate of the month this falls in.")
def set_cmd(tenant: str, amount: str | None, standard_units: str | None,
            micro_units: str | None, at: str | None) -> None:
    """Set (or change) a tenant's thresholds, then compare them with its latest estimate.

    A threshold already reached raises usage.threshold now; raising a crossed
    threshold above the projection sends usage.threshold_cleared now.
    """
    from billing.alerts import parse_threshold, set_alert
    from billing.catalog import catalog_for
    from jobs.runtime.context import actor
    from metering.timeutil import period_of

    given = dict(zip([m for m, _ in _OPTIONS], (amount, standard_units, micro_units),
                     strict=True))
    if all(v is None for v in given.values()):
        fail("give at least one threshold: --amount, --standard-units or --micro-units",
             EXIT_BAD_INPUT)
    state = current_state()
    now = parse_at(at)
    catalog = catalog_for(period_of(now, state.settings.zone))
    thresholds = {
        measure: parse_threshold(measure, text, minor_units=catalog.minor_units,
                                 currency=catalog.currency)
        for measure, text in given.items() if text is not None
    }
    engine = state.engine()
    who = actor()
    with engine.begin() as conn:
        results = [set_alert(conn, tenant=tenant, measure=measure, threshold=value, now=now,
                             actor=who, zone=state.settings.zone)
                   for measure, value in thresholds.items()]
    _print_set(tenant, catalog.currency, results)


def _print_set(tenant: str, currency: str, results: list[AlertSet]) -> None:
    from billing.alerts import decimal_text

    rows = []
    for r in results:
        a = r.alert
        unit = f" {currency}" if a.measure == "amount" else ""
        was = ("new" if r.created else "unchanged" if r.previous == a.threshold
               else decimal_text(r.previous) if r.previous is not None else "")
        rows.append([a.measure, decimal_text(a.threshold) + unit, was, _value(a),
                     _when(a.as_of), _state(a), r.event or ""])
    print_table(f"budget alerts of {quote_name(tenant)} ({results[0].period})",
                ["measure", "threshold", "before", "projected", "as of", "now", "event sent"],
                rows, right=["threshold", "before", "projected"])
    for r in results:
        if r.event:
            print_line(f"{r.event} queued for {quote_name(tenant)} ({r.alert.measure})")


@alerts_group.command("list")
@click.option("--tenant", "tenants", multiple=True, metavar="ID",
              help="Only this tenant (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def list_cmd(tenants: tuple[str, ...], fmt: str) -> None:
    """Show the alerts, each with its state in the latest month it was evaluated."""
    from billing.alerts import decimal_text, list_alerts
    from metering.db import reading

    engine = current_state().engine()
    with reading(engine) as conn:
        alerts = list_alerts(conn, list(tenants) or None)
    if fmt == "json":
        click.echo(json.dumps({"alerts": [a.to_json() for a in alerts]}, ensure_ascii=False))
        return
    if not alerts:
        print_line("no budget alerts" + (" for these tenants" if tenants else ""))
        return
    print_table("budget alerts", ["tenant", "measure", "threshold", "period", "projected",
                                  "as of", "state", "updated", "by"],
                [[a.tenant, a.measure, decimal_text(a.threshold), a.period or "", _value(a),
                  _when(a.as_of), _state(a), _when(a.updated_at), a.updated_by]
                 for a in alerts],
                right=["threshold", "projected"])


@alerts_group.command("remove")
@click.option("--tenant", required=True, metavar="ID", help="The tenant's key.")
@click.option("--measure", type=click.Choice([m for m, _ in _OPTIONS]),
              help="The alert to remove.")
@click.option("--all", "every", is_flag=True, help="Remove all the tenant's alerts.")
def remove_cmd(tenant: str, measure: str | None, every: bool) -> None:
    """Remove a tenant's alert (--measure) or all of them (--all). Sends no event."""
    from billing.alerts import remove_alert

    if (measure is None) == (not every):
        fail("give either --measure MEASURE or --all", EXIT_BAD_INPUT)
    engine = current_state().engine()
    with engine.begin() as conn:
        removed = remove_alert(conn, tenant=tenant, measure=measure)
    if not removed:
        what = f"no {measure} alert" if measure else "no alerts"
        print_line(f"{quote_name(tenant)} has {what}: nothing removed")
        return
    print_line(f"removed {', '.join(removed)} alert(s) of {quote_name(tenant)} (no event sent)")
