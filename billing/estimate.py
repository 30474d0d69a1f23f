"""Month-to-date estimates: what each tenant would owe if the month ended now, and where the
month is heading.

**Month to date (MTD).** For a billing month ``[start, end)`` of ``N`` hours and an hour
boundary ``as_of`` (the exclusive end of the hours counted), the estimate is the close itself
"if the month ended at ``as_of``": :func:`billing.repository.month_sums` over
``[start, as_of)`` with the divisor ``N`` of the *whole* month, rated by
:func:`billing.rules.rate` under the month's catalog. Hours not lived yet count as zero, exactly
as unpaid hours do, so at ``as_of = end`` the MTD estimate *is* the invoice the close writes
(same sums, same rules, same content hash). There is no second implementation of any rule here.

**Projection: the last complete day carried forward** (``method = "last_day"``). Let ``R`` be
the hours of ``[as_of, end)`` and the profile ``P = [D_start, D_end)`` the last complete local
day of the month before ``as_of`` (``D_end`` the latest local midnight ``≤ as_of``, ``D_start``
the midnight before it; ``|P|`` is 24 except on a DST day). Write ``R = q·|P| + r``. The month
ends at a local midnight, so the ``r`` leftover hours are the hours of the day still to come,
i.e. the profile's *last* ``r`` hours::

    projected sums = MTD sums + q × sums(P) + sums([D_end − r h, D_end))

and the projection is ``rate(projected sums)``: every quantity (paid hours, hosts, overage,
service metrics, monitors, each anomaly-detection role) carried forward hour for hour. On the
first day of the month there is no complete day yet (``method = "hours_so_far"``): the profile
is the elapsed hours ``[start, as_of)`` and the same formula applies with ``|P|`` the elapsed
hours. At the month's end ``R = 0`` (``method = "complete"``) and the projection equals MTD.

Cost: every part is :func:`~billing.repository.month_sums` (two set-based statements for all
tenants), so an estimate is at most six statements whatever the number of tenants, plus one
for the tenants' ids and one for the snapshot coverage; the rest is arithmetic in memory.

**Coverage.** Hours of ``[start, as_of)`` never snapshotted count as zero in the estimate; it
does not rebuild them (it only reads). :func:`compute` logs one ``estimate_hours_missing``
warning and each estimate carries ``hours_missing``.

:func:`store` writes the estimates into ``usage_estimates`` (the rows of the same
``(period, as_of)`` are replaced), in the caller's transaction; :func:`history` reads them back
over a month (the fleet's projected total per hour and the largest tenants' series) for the
dashboard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from billing import notices as n
from billing import repository as repo
from billing.catalog import Catalog, catalog_for
from billing.rules import MonthSums, Rating, rate
from metering import models as m
from metering.db import bulk_insert
from metering.errors import InvalidWindow
from metering.snapshot import missing_hours
from metering.timeutil import HOUR, as_utc, floor_hour, month_bounds, period_of

__all__ = [
    "METHODS",
    "EstimateHistory",
    "Profile",
    "TenantEstimate",
    "add_sums",
    "compute",
    "estimate_rows",
    "history",
    "hours_missing",
    "period_at",
    "profile",
    "store",
]

log = structlog.get_logger("hostmeter.estimate")

METHODS = ("last_day", "hours_so_far", "complete")
"""The projection methods, as stored in ``usage_estimates.method`` (see the module docstring)."""


def _hours(start: datetime, end: datetime) -> int:
    return int((end - start) / HOUR)


def period_at(as_of: datetime, zone: ZoneInfo) -> str:
    """The month an estimate at ``as_of`` is about: the month of the last complete hour
    (``as_of − 1 h``). At the first midnight of a month it is the month that just ended, with
    all its hours."""
    return period_of(floor_hour(as_of) - HOUR, zone)


def _local_midnight(instant: datetime, zone: ZoneInfo, days_before: int = 0) -> datetime:
    """The local midnight (in ``zone``) that starts the local day of ``instant``, or the one
    ``days_before`` days earlier, as UTC."""
    day = as_utc(instant).astimezone(zone).date() - timedelta(days=days_before)
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """The hours carried forward to the month's end: ``[start, end)``, ``q`` whole times, then
    the last ``leftover`` hours of it once more."""

    method: str
    start: datetime
    end: datetime
    times: int
    leftover: int

    @property
    def hours(self) -> int:
        return _hours(self.start, self.end)


def profile(period: str, as_of: datetime, zone: ZoneInfo) -> Profile:
    """The projection's profile for an estimate of ``period`` at ``as_of`` (an hour boundary
    in ``[start, end]`` of the month; see the module docstring)."""
    start, end = month_bounds(period, zone)
    remaining = _hours(as_of, end)
    if remaining <= 0 or as_of <= start:
        return Profile(method="complete" if remaining <= 0 else "hours_so_far", start=as_of,
                       end=as_of, times=0, leftover=0)
    day_end = _local_midnight(as_of, zone)
    day_start = _local_midnight(as_of, zone, days_before=1)
    if day_start >= start:
        method, p_start, p_end = "last_day", day_start, day_end
    else:
        method, p_start, p_end = "hours_so_far", start, as_of
    times, leftover = divmod(remaining, _hours(p_start, p_end))
    return Profile(method=method, start=p_start, end=p_end, times=times, leftover=leftover)


def add_sums(base: MonthSums, other: MonthSums | None, times: int = 1) -> MonthSums:
    """``base + times × other``, quantity by quantity (paid hours and every role too). The
    free-plan peak is a maximum, not a sum: the larger of the two."""
    if other is None or times == 0:
        return base
    roles = dict(base.roles)
    for role, hosts in other.roles:
        roles[role] = roles.get(role, 0) + times * hosts
    return replace(
        base,
        paid_hours=base.paid_hours + times * other.paid_hours,
        standard_hosts=base.standard_hosts + times * other.standard_hosts,
        micro_hosts=base.micro_hosts + times * other.micro_hosts,
        standard_overage=base.standard_overage + times * other.standard_overage,
        micro_overage=base.micro_overage + times * other.micro_overage,
        service_metrics=base.service_metrics + times * other.service_metrics,
        monitors=base.monitors + times * other.monitors,
        roles=tuple(sorted(roles.items())),
        free_max_hosts=max(base.free_max_hosts, other.free_max_hosts),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantEstimate:
    """One tenant's month to date and projection at ``as_of``."""

    tenant: str
    tenant_id: int
    period: str
    as_of: datetime
    hours_in_month: int
    hours_elapsed: int
    hours_missing: int
    """Hours of ``[start, as_of)`` never snapshotted (counted as zero; the same for every
    tenant of one estimate)."""
    paid_hours: int
    method: str
    sums: MonthSums
    """The month-to-date sums (``avg(Q) = ΣQ / hours_in_month`` exactly)."""
    projected_sums: MonthSums
    mtd: Rating
    projected: Rating

    def average(self, quantity: str, *, projected: bool = False) -> Fraction:
        """The exact average of a :class:`MonthSums` quantity (``"standard_hosts"``)."""
        sums = self.projected_sums if projected else self.sums
        return Fraction(int(getattr(sums, quantity)), self.hours_in_month)


def _check_as_of(period: str, as_of: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    start, end = month_bounds(period, zone)
    if as_of != floor_hour(as_of):
        raise InvalidWindow(f"as_of {as_of.isoformat()} is not an hour boundary",
                            period=period)
    if not start <= as_of <= end:
        raise InvalidWindow(
            f"as_of {as_of.isoformat()} is outside {period} ({start.isoformat()} to "
            f"{end.isoformat()})", period=period)
    return start, end


def hours_missing(conn: Connection, *, period: str, as_of: datetime,
                  zone: ZoneInfo) -> list[datetime]:
    """Hours of ``[start, as_of)`` of ``period`` that were never snapshotted."""
    start, _ = _check_as_of(period, as_utc(as_of), zone)
    return missing_hours(conn, start, as_utc(as_of))


def compute(
    conn: Connection,
    *,
    period: str,
    as_of: datetime,
    zone: ZoneInfo,
    catalogs: Sequence[Catalog] | None = None,
    tenant_ids: Sequence[int] | None = None,
    missing: Sequence[datetime] | None = None,
) -> list[TenantEstimate]:
    """Every tenant (of ``tenant_ids``, default all) with a paid hour in ``[start, as_of)``:
    its month to date and projection, by tenant key. Reads only. ``missing``: the hours
    :func:`hours_missing` already found, when the caller has asked (not asked again)."""
    as_of = as_utc(as_of)
    start, end = _check_as_of(period, as_of, zone)
    catalog = catalog_for(period, catalogs)
    n_hours = _hours(start, end)
    gaps = list(missing) if missing is not None else missing_hours(conn, start, as_of)
    if gaps:
        log.warning("estimate_hours_missing", period=period, as_of=as_of.isoformat(),
                    hours=len(gaps), first=gaps[0].isoformat(), last=gaps[-1].isoformat())
    mtd = {k: s for k, s in repo.month_sums(conn, start, as_of, n_hours, tenant_ids).items()
           if s.paid_hours > 0}
    if not mtd:
        return []
    prof = profile(period, as_of, zone)
    whole = (repo.month_sums(conn, prof.start, prof.end, n_hours, tenant_ids)
             if prof.times else {})
    tail = (repo.month_sums(conn, prof.end - prof.leftover * HOUR, prof.end, n_hours,
                            tenant_ids) if prof.leftover else {})
    ids = _tenant_ids(conn, tenant_ids)
    out: list[TenantEstimate] = []
    for key in sorted(mtd):
        sums = mtd[key]
        projected = add_sums(add_sums(sums, whole.get(key), prof.times), tail.get(key))
        out.append(TenantEstimate(
            tenant=key, tenant_id=ids[key], period=period, as_of=as_of,
            hours_in_month=n_hours, hours_elapsed=_hours(start, as_of),
            hours_missing=len(gaps), paid_hours=sums.paid_hours, method=prof.method,
            sums=sums, projected_sums=projected,
            mtd=rate(sums, catalog), projected=rate(projected, catalog),
        ))
    return out


def _tenant_ids(conn: Connection, tenant_ids: Sequence[int] | None) -> dict[str, int]:
    t = m.tenants
    query = sa.select(t.c.key, t.c.id)
    if tenant_ids is not None:
        query = query.where(t.c.id.in_(list(tenant_ids)))
    return {str(k): int(i) for k, i in conn.execute(query)}


def estimate_rows(estimates: Sequence[TenantEstimate], *, computed_at: datetime,
                  run_id: str) -> list[dict[str, Any]]:
    """The ``usage_estimates`` rows of ``estimates`` (column names → values)."""
    return [
        {"period": e.period, "tenant_id": e.tenant_id, "as_of": e.as_of,
         "hours_in_month": e.hours_in_month, "hours_elapsed": e.hours_elapsed,
         "paid_hours": e.paid_hours, "catalog_version": e.mtd.catalog_version,
         "currency": e.mtd.currency, "minor_units": e.mtd.minor_units,
         "mtd_standard_units": e.mtd.standard_units, "mtd_micro_units": e.mtd.micro_units,
         "mtd_total": e.mtd.total,
         "projected_standard_units": e.projected.standard_units,
         "projected_micro_units": e.projected.micro_units,
         "projected_total": e.projected.total, "method": e.method,
         "computed_at": computed_at, "run_id": run_id}
        for e in estimates
    ]


def store(
    conn: Connection,
    estimates: Sequence[TenantEstimate],
    *,
    computed_at: datetime,
    run_id: str,
    period: str | None = None,
    as_of: datetime | None = None,
) -> int:
    """Write ``estimates`` into ``usage_estimates``, replacing every row of the same
    ``(period, as_of)``: one ``DELETE`` per pair, then one bulk insert. ``period`` and
    ``as_of`` name a pair to clear even when ``estimates`` is empty (a rerun that finds no
    paying tenant any more). Returns the rows written."""
    pairs = {(e.period, e.as_of) for e in estimates}
    if period is not None and as_of is not None:
        pairs.add((period, as_utc(as_of)))
    ue = n.usage_estimates
    for p, a in sorted(pairs):
        conn.execute(sa.delete(ue).where(ue.c.period == p, ue.c.as_of == a))
    return bulk_insert(conn, ue, estimate_rows(estimates, computed_at=computed_at,
                                               run_id=run_id))


def thin(conn: Connection, *, before: datetime) -> int:
    """Bound the hourly history: of the rows with ``as_of`` before ``before``, delete every row
    but each (period, tenant)'s latest. ``prune-usage`` passes the start of the previous
    billing month, so the current and the previous month keep every hour (what the dashboard
    draws) and older months keep their last estimate. One statement; running it again deletes
    nothing more. Returns the rows deleted."""
    ue = n.usage_estimates
    later = ue.alias("later")
    return int(conn.execute(
        sa.delete(ue).where(
            ue.c.as_of < as_utc(before),
            sa.exists().where(later.c.period == ue.c.period,
                              later.c.tenant_id == ue.c.tenant_id,
                              later.c.as_of > ue.c.as_of),
        ).execution_options(preserve_rowcount=True)
    ).rowcount)


Series = tuple[tuple[datetime, int], ...]
"""``(as_of, projected total in minor units)``, oldest first."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EstimateHistory:
    """The stored estimates of one month: the fleet's projected total at every ``as_of``, and
    the series of the ``top`` tenants by their latest projected total (largest first)."""

    period: str
    currency: str
    minor_units: int
    fleet: Series
    tenants: tuple[tuple[str, Series], ...]


def history(conn: Connection, *, period: str, top: int = 5,
            tenants: Sequence[str] = ()) -> EstimateHistory | None:
    """The stored estimates of ``period`` (``None`` when there are none): three statements,
    the fleet's sums per hour, the top tenants at the latest hour (or the ``tenants`` named,
    in that order; an unknown key raises :class:`~billing.errors.UnknownTenant`), and their
    series."""
    ue, t = n.usage_estimates, m.tenants
    fleet = conn.execute(
        sa.select(ue.c.as_of, sa.func.sum(ue.c.projected_total), sa.func.min(ue.c.currency),
                  sa.func.min(ue.c.minor_units))
        .where(ue.c.period == period).group_by(ue.c.as_of).order_by(ue.c.as_of)).all()
    if not fleet:
        return None
    latest = fleet[-1][0]
    if tenants:
        order = list(dict.fromkeys(tenants))
        named = repo.resolve_tenants(conn, order)
        leaders = [(named[key], key) for key in order]
    else:
        leaders = [(tid, key) for tid, key in conn.execute(
            sa.select(ue.c.tenant_id, t.c.key)
            .join(t, t.c.id == ue.c.tenant_id)
            .where(ue.c.period == period, ue.c.as_of == latest)
            .order_by(ue.c.projected_total.desc(), t.c.key).limit(top))]
    series: dict[int, list[tuple[datetime, int]]] = {tid: [] for tid, _ in leaders}
    if leaders:
        for tid, as_of, total in conn.execute(
            sa.select(ue.c.tenant_id, ue.c.as_of, ue.c.projected_total)
            .where(ue.c.period == period, ue.c.tenant_id.in_(list(series)))
            .order_by(ue.c.as_of)
        ):
            series[int(tid)].append((as_of, int(total)))
    return EstimateHistory(
        period=period, currency=str(fleet[-1][2]), minor_units=int(fleet[-1][3]),
        fleet=tuple((a, int(total)) for a, total, _, _ in fleet),
        tenants=tuple((str(key), tuple(series[int(tid)])) for tid, key in leaders),
    )
