"""``hostmeter usage``: month-to-date usage estimates (``usage estimate``).

``usage estimate`` computes live, read-only, with the same function the hourly
``estimate-usage`` job stores (:func:`billing.estimate.compute`): what each paying tenant would
owe if the month ended at the hour ``--at`` falls in, and the projection to the month's end.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import click

from jobs.cli.console import print_line, print_table
from jobs.cli.errors import Group
from jobs.cli.state import current_state, parse_at
from metering.timeutil import HOUR, floor_hour, month_bounds

if TYPE_CHECKING:  # the billing code is imported by the command that runs it
    from billing.estimate import Profile, TenantEstimate
    from billing.rules import Rating

__all__ = ["print_estimates", "usage_group"]


@click.group("usage", cls=Group)
def usage_group() -> None:
    """Month-to-date usage: what each tenant would pay if the month ended now, and the
    projection to the month's end."""


def _fraction(value: Fraction) -> str:
    """``85/31 (2.74)``; a whole number alone."""
    if value.denominator == 1:
        return str(value.numerator)
    shown = (Decimal(value.numerator) / Decimal(value.denominator)).quantize(
        Decimal("0.01"), rounding=ROUND_HALF_UP)
    return f"{value} ({shown})"


def _local(t: datetime, zone: ZoneInfo) -> str:
    return t.astimezone(zone).strftime("%Y-%m-%d %H:%M")


def _method_text(prof: Profile, zone: ZoneInfo) -> str:
    if prof.method == "complete":
        return "complete: the month is over, the projection is the month to date"
    span = f"{_local(prof.start, zone)} to {_local(prof.end, zone)} {zone.key}"
    what = ("last_day: the last complete day" if prof.method == "last_day"
            else "hours_so_far: the hours of the month so far (no complete day yet)")
    extra = f", then its last {prof.leftover} hour(s)" if prof.leftover else ""
    return f"{what} ({span}) carried forward {prof.times} time(s){extra}"


def _rating(r: Rating) -> dict[str, Any]:
    from billing.rules import format_money

    return {"standard_units": r.standard_units, "micro_units": r.micro_units,
            "subtotal": format_money(r.subtotal, r.minor_units),
            "tax": format_money(r.tax, r.minor_units),
            "total": format_money(r.total, r.minor_units)}


def _json(e: TenantEstimate) -> dict[str, Any]:
    return {
        "tenant": e.tenant, "paid_hours": e.paid_hours, "catalog": e.mtd.catalog_version,
        "currency": e.mtd.currency,
        "mtd": {"standard_hosts_average": str(e.average("standard_hosts")),
                "micro_hosts_average": str(e.average("micro_hosts")), **_rating(e.mtd)},
        "projected": {
            "standard_hosts_average": str(e.average("standard_hosts", projected=True)),
            "micro_hosts_average": str(e.average("micro_hosts", projected=True)),
            "paid_hours": e.projected_sums.paid_hours, **_rating(e.projected)},
    }


@usage_group.command("estimate")
@click.option("--tenant", "tenants", multiple=True, metavar="ID",
              help="Only this tenant (repeatable).")
@click.option("--at", metavar="ISO8601",
              help="Estimate as of the hour this instant falls in (default now).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def estimate_cmd(tenants: tuple[str, ...], at: str | None, fmt: str) -> None:
    """Month to date and projected units and amount per paying tenant.

    \b
    Month to date: exactly what the close would bill if the month ended at the
    start of the hour --at falls in (hours not lived yet count as zero).
    Projection: the last complete day's hourly usage carried forward to the
    month's end (on the 1st: the hours so far). Reads only; the hourly job
    estimate-usage stores the same figures.
    """
    from billing import estimate
    from billing import repository as repo
    from metering.db import reading

    as_of = floor_hour(parse_at(at))
    state = current_state()
    zone = state.settings.zone
    period = estimate.period_at(as_of, zone)
    engine = state.engine()
    with reading(engine) as conn:
        ids = list(repo.resolve_tenants(conn, tenants).values()) if tenants else None
        missing = estimate.hours_missing(conn, period=period, as_of=as_of, zone=zone)
        estimates = estimate.compute(conn, period=period, as_of=as_of, zone=zone,
                                     tenant_ids=ids, missing=missing)
    prof = estimate.profile(period, as_of, zone)
    if fmt == "json":
        first, end = month_bounds(period, zone)
        click.echo(json.dumps({
            "period": period, "as_of": as_of.isoformat(),
            "hours_in_month": (end - first) // HOUR, "hours_elapsed": (as_of - first) // HOUR,
            "hours_missing": len(missing), "method": prof.method,
            "profile": {"start": prof.start.isoformat(), "end": prof.end.isoformat(),
                        "times": prof.times, "leftover_hours": prof.leftover},
            "tenants": [_json(e) for e in estimates],
        }, ensure_ascii=False))
        return
    print_estimates(estimates, period=period, as_of=as_of, zone=zone, missing=len(missing))


def print_estimates(estimates: list[TenantEstimate], *, period: str, as_of: datetime,
                    zone: ZoneInfo, missing: int) -> None:
    """The estimate table and its footer (as of, method, coverage), for ``usage estimate`` and
    the demo."""
    from billing import estimate
    from billing.rules import format_money

    prof = estimate.profile(period, as_of, zone)
    if not estimates:
        print_line(f"no tenant has a paid hour in {period} before {as_of.isoformat()} "
                   "(nothing to estimate)")
        _footer(period, as_of, zone, prof, missing, None)
        return
    rows = []
    for e in estimates:
        m, p = e.mtd, e.projected
        rows.append([
            e.tenant, _fraction(e.average("standard_hosts")),
            _fraction(e.average("micro_hosts")), f"{m.standard_units}/{m.micro_units}",
            format_money(m.total, m.minor_units), f"{p.standard_units}/{p.micro_units}",
            format_money(p.total, p.minor_units), m.currency,
        ])
    print_table(f"usage estimate {period} (catalog {estimates[0].mtd.catalog_version})",
                ["tenant", "std hosts avg", "micro hosts avg", "MTD std/micro", "MTD amount",
                 "projected std/micro", "projected amount", "cur"], rows,
                right=["MTD amount", "projected amount"])
    _footer(period, as_of, zone, prof, missing, estimates[0])


def _footer(period: str, as_of: datetime, zone: ZoneInfo, prof: Profile, missing: int,
            first: TenantEstimate | None) -> None:
    elapsed = f"; {first.hours_elapsed} of {first.hours_in_month} hours" if first else ""
    print_line(f"as of {as_of.isoformat()} ({_local(as_of, zone)} {zone.key}){elapsed} of "
               f"{period}; averages are month to date over every hour of the month")
    print_line(f"projection method {_method_text(prof, zone)}")
    if missing:
        print_line(f"coverage: {missing} hour(s) before {as_of.isoformat()} not snapshotted "
                   "(counted as zero here; the close rebuilds them)")
    else:
        print_line("coverage: every hour so far is snapshotted")
    print_line("the hourly job estimate-usage stores the same figures (usage_estimates)")
