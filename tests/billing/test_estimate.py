"""Month-to-date estimates (:mod:`billing.estimate`): the projection's numbers by hand on a
small constructed month, the first-day fallback, gaps, the tenants counted, and storing.

Snapshots are written straight into ``usage_snapshots`` (and the hours into
``snapshot_hours``), so every hourly quantity is known exactly. October 2026 in Asia/Tokyo:
744 hours from 2026-09-30T15:00Z.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from billing import estimate
from billing import notices as n
from billing.catalog import catalog_for
from billing.rules import MonthSums, rate
from metering import models as m
from metering.errors import InvalidWindow
from metering.timeutil import HOUR, hours_between, month_bounds

PERIOD = "2026-10"
ZONE = ZoneInfo("Asia/Tokyo")
START, END = month_bounds(PERIOD, ZONE)
N = 744
NOW = datetime(2026, 10, 20, tzinfo=UTC)


def local(day: int, hour: int = 0) -> datetime:
    """The UTC instant of ``2026-10-<day> <hour>:00`` in Tokyo."""
    return datetime(2026, 10, day, tzinfo=ZONE).astimezone(UTC) + hour * HOUR


Usage = Callable[[datetime], dict[str, int] | None]
"""Hour → the snapshot's quantities (plus ``role``: hosts in role ``web``), or None: no row."""


def seed(engine: Engine, tenants: dict[str, tuple[str, Usage]],
         hours: Iterable[datetime]) -> dict[str, int]:
    """Snapshot rows for ``hours`` (plan, usage per hour), and the hours as snapshotted."""
    hours = list(hours)
    with engine.begin() as conn:
        ids = {}
        for key in tenants:
            ids[key] = conn.execute(sa.insert(m.tenants).values(key=key)
                                    .returning(m.tenants.c.id)).scalar_one()
        rows, roles = [], []
        for key, (plan, usage) in tenants.items():
            for h in hours:
                q = usage(h)
                if q is None:
                    continue
                q = dict(q)
                role = q.pop("role", 0)
                rows.append({"tenant_id": ids[key], "hour": h, "plan": plan,
                             "standard_hosts": 0, "micro_hosts": 0, "standard_overage": 0,
                             "micro_overage": 0, "host_metrics": 0, "service_metrics": 0,
                             "monitors": 0, "standard_metric_limit": 200,
                             "micro_metric_limit": 30, **q})
                if role:
                    roles.append({"tenant_id": ids[key], "hour": h, "role": "web",
                                  "hosts": role})
        if rows:
            conn.execute(sa.insert(m.usage_snapshots), rows)
        if roles:
            conn.execute(sa.insert(m.usage_snapshot_roles), roles)
        conn.execute(sa.insert(m.snapshot_hours), [
            {"hour": h, "snapshotted_at": NOW, "run_id": "seed", "tenants": len(tenants)}
            for h in hours])
    return ids


def compute(engine: Engine, as_of: datetime, **kw: object) -> dict[str, estimate.TenantEstimate]:
    with engine.connect() as conn:
        return {e.tenant: e for e in estimate.compute(conn, period=PERIOD, as_of=as_of,
                                                      zone=ZONE, **kw)}  # type: ignore[arg-type]


def hour_of_day(h: datetime) -> int:
    return h.astimezone(ZONE).hour


# --- the profile -------------------------------------------------------------------------------

PROFILES = [
    # as_of (local day, hour) → method, profile [start, end), whole times, leftover hours
    pytest.param((3, 7), "last_day", local(2), local(3), 28, 17, id="day3_07:00"),
    pytest.param((3, 0), "last_day", local(2), local(3), 29, 0, id="day3_midnight_no_leftover"),
    pytest.param((2, 0), "last_day", local(1), local(2), 30, 0, id="day2_midnight_first_day"),
    pytest.param((31, 23), "last_day", local(30), local(31), 0, 1, id="last_hour_left"),
    pytest.param((1, 10), "hours_so_far", local(1), local(1, 10), 73, 4, id="day1_10:00"),
    pytest.param((1, 1), "hours_so_far", local(1), local(1, 1), 743, 0, id="day1_01:00"),
]


@pytest.mark.parametrize(("at", "method", "p_start", "p_end", "times", "leftover"), PROFILES)
def test_profile(at: tuple[int, int], method: str, p_start: datetime, p_end: datetime,
                 times: int, leftover: int) -> None:
    as_of = local(*at)
    p = estimate.profile(PERIOD, as_of, ZONE)
    assert (p.method, p.start, p.end, p.times, p.leftover) == (
        method, p_start, p_end, times, leftover)
    # the projection covers exactly the hours left: R = q·|P| + r
    assert p.times * p.hours + p.leftover == (END - as_of) // HOUR


def test_profile_on_a_dst_day_has_its_own_length() -> None:
    """New York, November 2026: the clocks go back on the 1st, a 25-hour day. The profile is
    that day, and the hours left are still covered exactly: R = q·25 + r."""
    ny = ZoneInfo("America/New_York")
    start, end = month_bounds("2026-11", ny)
    as_of = datetime(2026, 11, 2, 5, tzinfo=ny).astimezone(UTC)
    p = estimate.profile("2026-11", as_of, ny)
    assert (p.method, p.hours) == ("last_day", 25)
    assert (p.start, p.end) == (start, datetime(2026, 11, 2, tzinfo=ny).astimezone(UTC))
    remaining = (end - as_of) // HOUR
    assert remaining == 29 * 24 - 5
    assert (p.times, p.leftover) == divmod(remaining, 25)


def test_profile_at_month_end_is_complete() -> None:
    p = estimate.profile(PERIOD, END, ZONE)
    assert (p.method, p.times, p.leftover) == ("complete", 0, 0)


def test_period_at_is_the_month_of_the_last_complete_hour() -> None:
    assert estimate.period_at(END, ZONE) == "2026-10"  # 00:00 on Nov 1st: October, complete
    assert estimate.period_at(END + HOUR, ZONE) == "2026-11"
    assert estimate.period_at(local(15, 10), ZONE) == "2026-10"


# --- projections by hand ------------------------------------------------------------------------


def test_last_day_profile_carried_forward_by_hand(engine: Engine) -> None:
    """acme: 10 hosts all of day 1, 1..24 hosts by the hour of day 2, 50 hosts on day 3 so far;
    role web 5 hosts every hour. At day 3 07:00 (55 hours lived): R = 689 = 28 × 24 + 17, and
    the 17 leftover hours are day 2's hours 07..23 (8 + … + 24 hosts = 272)."""
    as_of = local(3, 7)

    def acme(h: datetime) -> dict[str, int]:
        if h < local(2):
            hosts = 10
        elif h < local(3):
            hosts = hour_of_day(h) + 1
        else:
            hosts = 50
        return {"standard_hosts": hosts, "micro_hosts": 1 if h >= local(2, 20) else 0,
                "role": 5}

    seed(engine, {"acme": ("standard", acme)}, hours_between(START, as_of))
    e = compute(engine, as_of)["acme"]
    mtd_hosts = 24 * 10 + 300 + 7 * 50
    assert e.sums.standard_hosts == mtd_hosts == 890
    # micro: day 2 20:00..23:00 (4 hours) and the 7 hours of day 3 so far
    assert e.sums.micro_hosts == 11
    assert (e.method, e.hours_elapsed, e.hours_in_month, e.paid_hours) == (
        "last_day", 55, N, 55)
    p = e.projected_sums
    assert p.standard_hosts == 890 + 28 * 300 + 272 == 9562
    assert p.micro_hosts == 11 + 28 * 4 + 4
    assert p.paid_hours == 55 + 28 * 24 + 17 == N
    assert p.roles == (("web", 5 * N),)
    # rated by the same rules: ⌈9562/744⌉ = 13 standard hosts, ⌈127/744⌉ = 1 micro host,
    # ⌈3720/(5·744)⌉ = 1 anomaly-detection unit
    assert (e.projected.standard_units, e.projected.micro_units) == (14, 1)
    assert (e.mtd.standard_units, e.mtd.micro_units) == (2 + 1, 1)
    catalog = catalog_for(PERIOD)
    assert e.projected == rate(MonthSums(
        tenant="acme", hours_in_month=N, paid_hours=N, standard_hosts=9562, micro_hosts=127,
        roles=(("web", 5 * N),)), catalog)
    assert e.projected.total == 14 * 1833 + 660
    assert e.average("standard_hosts") == Fraction(890, 744)


def test_first_day_uses_the_hours_so_far(engine: Engine) -> None:
    """Day 1 10:00: no complete day yet. Profile = the 10 hours lived (1..10 hosts, 55 in all),
    R = 734 = 73 × 10 + 4; the 4 leftover hours are the profile's last four (7+8+9+10)."""
    as_of = local(1, 10)
    seed(engine, {"acme": ("standard", lambda h: {"standard_hosts": hour_of_day(h) + 1,
                                                  "service_metrics": 300})},
         hours_between(START, as_of))
    e = compute(engine, as_of)["acme"]
    assert e.method == "hours_so_far"
    assert e.sums.standard_hosts == 55
    assert e.projected_sums.standard_hosts == 55 + 73 * 55 + 34
    assert e.projected_sums.paid_hours == N
    assert e.projected_sums.service_metrics == 300 * N
    # service metrics 300 every hour: ⌈(300 − 200)/200⌉ = 1 unit projected; month to date the
    # average is 3000/744 < 200: no overage yet
    items = {ln.item: ln.units for ln in e.projected.lines}
    assert items["service_metric_overage"] == 1
    assert "service_metric_overage" not in {ln.item for ln in e.mtd.lines}


def test_unpaid_hours_in_the_profile_stay_unpaid(engine: Engine) -> None:
    """A tenant on trial until day 2 12:00, then standard: the profile (day 2) carries 12 paid
    hours a day, not 24."""
    as_of = local(3)

    def plan_of(h: datetime) -> str:
        return "trial" if h < local(2, 12) else "standard"

    ids = seed(engine, {"wayne": ("standard", lambda h: {"standard_hosts": 4})},
               hours_between(START, as_of))
    with engine.begin() as conn:
        for h in hours_between(START, as_of):
            conn.execute(sa.update(m.usage_snapshots)
                         .where(m.usage_snapshots.c.tenant_id == ids["wayne"],
                                m.usage_snapshots.c.hour == h)
                         .values(plan=plan_of(h)))
    e = compute(engine, as_of)["wayne"]
    assert e.paid_hours == 12
    assert e.projected_sums.paid_hours == 12 + 29 * 12
    assert e.projected_sums.standard_hosts == 4 * (12 + 29 * 12)


def test_month_end_estimate_is_the_month(engine: Engine) -> None:
    seed(engine, {"initech": ("standard", lambda h: {"standard_hosts": 3})},
         hours_between(START, END))
    e = compute(engine, END)["initech"]
    assert (e.method, e.hours_elapsed, e.hours_missing) == ("complete", N, 0)
    assert e.projected == e.mtd
    assert e.mtd.standard_units == 3  # exactly 3 hosts every hour: 3 units, never 4


# --- gaps and the tenants counted --------------------------------------------------------------


def test_missing_hours_count_as_zero_and_are_reported(engine: Engine) -> None:
    gaps = {local(5, 3), local(5, 4), local(9, 20)}
    seed(engine, {"initech": ("standard", lambda h: {"standard_hosts": 3})},
         [h for h in hours_between(START, END) if h not in gaps])
    with capture_logs() as logs:
        e = compute(engine, END)["initech"]
    assert e.hours_missing == 3
    assert e.sums.standard_hosts == 3 * (N - 3) < 3 * N
    assert e.average("standard_hosts") < 3
    [warning] = [ev for ev in logs if ev["event"] == "estimate_hours_missing"]
    assert warning["log_level"] == "warning" and warning["hours"] == 3
    assert warning["first"] == local(5, 3).isoformat()
    with engine.connect() as conn:
        assert estimate.hours_missing(conn, period=PERIOD, as_of=END, zone=ZONE) == sorted(gaps)


def test_tenants_counted_are_those_with_a_paid_hour_so_far(engine: Engine) -> None:
    as_of = local(10)
    seed(engine, {
        "acme": ("standard", lambda h: {"standard_hosts": 1}),
        "tyrell": ("free", lambda h: {"standard_hosts": 3}),
        "stark": ("standard", lambda h: {"standard_hosts": 5} if h >= local(10) else None),
        "oscorp": ("standard", lambda h: {"monitors": 15}),
    }, hours_between(START, local(12)))
    assert sorted(compute(engine, as_of)) == ["acme", "oscorp"]
    with engine.connect() as conn:
        oscorp = conn.execute(sa.select(m.tenants.c.id).where(m.tenants.c.key == "oscorp")
                              ).scalar_one()
    only = compute(engine, as_of, tenant_ids=[oscorp])
    assert list(only) == ["oscorp"] and only["oscorp"].tenant_id == oscorp
    # monitors only: the minimum charge, month to date and projected
    assert [ln.item for ln in only["oscorp"].mtd.lines] == ["minimum_charge"]
    assert compute(engine, START) == {}


@pytest.mark.parametrize("as_of", [
    pytest.param(local(3, 7) + timedelta(minutes=15), id="not_an_hour_boundary"),
    pytest.param(START - HOUR, id="before_the_month"),
    pytest.param(END + HOUR, id="after_the_month"),
])
def test_as_of_outside_the_month_or_between_hours_is_refused(engine: Engine,
                                                             as_of: datetime) -> None:
    with engine.connect() as conn, pytest.raises(InvalidWindow):
        estimate.compute(conn, period=PERIOD, as_of=as_of, zone=ZONE)


# --- store ---------------------------------------------------------------------------------------


def _stored(engine: Engine) -> list[tuple[Any, ...]]:
    ue = n.usage_estimates
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            sa.select(ue.c.tenant_id, ue.c.as_of, ue.c.mtd_total, ue.c.projected_total,
                      ue.c.method, ue.c.run_id).order_by(ue.c.as_of, ue.c.tenant_id))]


def test_store_replaces_the_rows_of_the_same_as_of(engine: Engine) -> None:
    seed(engine, {"acme": ("standard", lambda h: {"standard_hosts": 2}),
                  "initech": ("standard", lambda h: {"standard_hosts": 3})},
         hours_between(START, local(4)))
    for as_of, run in ((local(3), "r1"), (local(3), "r2"), (local(4), "r3")):
        with engine.begin() as conn:
            found = estimate.compute(conn, period=PERIOD, as_of=as_of, zone=ZONE)
            assert estimate.store(conn, found, computed_at=NOW, run_id=run) == 2
    rows = _stored(engine)
    assert [(r[1], r[5]) for r in rows] == [(local(3), "r2")] * 2 + [(local(4), "r3")] * 2
    ids = sorted(r[0] for r in rows[:2])
    e = compute(engine, local(3))
    assert [(r[2], r[3], r[4]) for r in rows[:2]] == [
        (e[k].mtd.total, e[k].projected.total, "last_day")
        for k in sorted(e, key=lambda k: e[k].tenant_id)]
    # an empty result still clears the pair it names
    with engine.begin() as conn:
        assert estimate.store(conn, [], computed_at=NOW, run_id="r4", period=PERIOD,
                              as_of=local(3)) == 0
    assert sorted(r[0] for r in _stored(engine)) == ids
    assert {r[1] for r in _stored(engine)} == {local(4)}


def test_thin_keeps_each_old_months_last_estimate_and_every_recent_hour(engine: Engine) -> None:
    """Before the cut-off only the last estimate of each (month, tenant) stays; from the
    cut-off on every hour stays; thinning again deletes nothing."""
    zone = ZoneInfo("Asia/Tokyo")
    months = {p: month_bounds(p, zone) for p in ("2026-08", "2026-09", "2026-10")}
    with engine.begin() as conn:
        ids = [conn.execute(sa.insert(m.tenants).values(key=k).returning(m.tenants.c.id))
               .scalar_one() for k in ("acme", "initech")]
        rows = []
        for period, (first, end) in months.items():
            for as_of in (first + HOUR, first + 2 * HOUR, end - HOUR, end):
                for tid in ids:
                    rows.append({
                        "period": period, "tenant_id": tid, "as_of": as_of,
                        "hours_in_month": 744, "hours_elapsed": 1, "paid_hours": 1,
                        "catalog_version": "2019-10", "currency": "JPY", "minor_units": 0,
                        "mtd_standard_units": 1, "mtd_micro_units": 0, "mtd_total": 1833,
                        "projected_standard_units": 1, "projected_micro_units": 0,
                        "projected_total": 1833, "method": "last_day", "computed_at": NOW,
                        "run_id": "r"})
        conn.execute(sa.insert(n.usage_estimates), rows)
    before = months["2026-10"][0]  # the start of the previous month when the run is in November
    with engine.begin() as conn:
        assert estimate.thin(conn, before=before) == 2 * 2 * 3  # Aug and Sep: 3 of 4 rows each
    ue = n.usage_estimates
    with engine.connect() as conn:
        left = conn.execute(sa.select(ue.c.period, ue.c.as_of)
                            .where(ue.c.tenant_id == ids[0]).order_by(ue.c.as_of)).all()
    assert [(p, a) for p, a in left] == [
        ("2026-08", months["2026-08"][1]), ("2026-09", months["2026-09"][1]),
        *[("2026-10", a) for a in (months["2026-10"][0] + HOUR, months["2026-10"][0] + 2 * HOUR,
                                   months["2026-10"][1] - HOUR, months["2026-10"][1])]]
    with engine.begin() as conn:
        assert estimate.thin(conn, before=before) == 0
