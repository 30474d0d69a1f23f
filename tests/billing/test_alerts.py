"""Budget alerts (billing.alerts): one event per crossing, cleared on the way down, the latest
word wins, on SQLite and PostgreSQL.

``usage_estimates`` rows are written here directly, as ``estimate-usage`` stores them; the
evaluation runs in the test's transaction as it does in that job's.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billing import alerts
from billing import notices as n
from billing.errors import InvalidThreshold, UnknownTenant
from billing.outbox import event_id
from metering import models as m

ZONE = ZoneInfo("Asia/Tokyo")
PERIOD = "2026-10"
NEXT = "2026-11"
T0 = datetime(2026, 10, 20, 0, tzinfo=UTC)  # an hour boundary inside PERIOD
ACTOR = "ops@test"


def hour(i: int) -> datetime:
    return T0 + timedelta(hours=i)


def add_tenant(conn: Connection, key: str) -> int:
    return int(conn.execute(sa.insert(m.tenants).values(key=key).returning(m.tenants.c.id))
               .scalar_one())


def estimate(tenant: str, tenant_id: int, as_of: datetime, *, total: int, std: int = 0,
             micro: int = 0, period: str = PERIOD, minor_units: int = 0,
             currency: str = "JPY") -> dict[str, Any]:
    """A usage_estimates row (by column name) plus the tenant's key."""
    return {
        "period": period, "tenant_id": tenant_id, "as_of": as_of, "hours_in_month": 744,
        "hours_elapsed": 100, "paid_hours": 100, "catalog_version": "2019-10",
        "currency": currency, "minor_units": minor_units,
        "mtd_standard_units": max(std - 1, 0), "mtd_micro_units": micro,
        "mtd_total": total // 2, "projected_standard_units": std,
        "projected_micro_units": micro, "projected_total": total, "method": "last_day",
        "computed_at": as_of, "run_id": "run-test", "tenant": tenant,
    }


def store(conn: Connection, row: dict[str, Any]) -> None:
    conn.execute(sa.insert(n.usage_estimates).values(
        **{k: v for k, v in row.items() if k != "tenant"}))


def run(engine: Engine, rows: list[dict[str, Any]], *, as_of: datetime,
        period: str = PERIOD, complete: bool = False) -> dict[str, int]:
    with engine.begin() as conn:
        return alerts.evaluate(conn, period=period, as_of=as_of, estimates=rows,
                               now=as_of + timedelta(minutes=15), run_id="run-test",
                               complete=complete)


def set_alert(engine: Engine, tenant: str, measure: str, threshold: str,
              now: datetime = T0) -> alerts.AlertSet:
    with engine.begin() as conn:
        return alerts.set_alert(conn, tenant=tenant, measure=measure,
                                threshold=Decimal(threshold), now=now, actor=ACTOR, zone=ZONE)


def events(engine: Engine) -> list[dict[str, Any]]:
    ev = n.outbox_events
    with engine.connect() as conn:
        rows = conn.execute(sa.select(ev.c.event_id, ev.c.type, ev.c.payload)
                            .order_by(ev.c.id)).all()
    return [{"id": r.event_id, "type": r.type, **r.payload} for r in rows]


def states(engine: Engine) -> list[tuple[Any, ...]]:
    s = n.budget_alert_states
    with engine.connect() as conn:
        return [(r.period, r.crossed, r.crossings, Decimal(str(r.value)).normalize(),
                 r.as_of.astimezone(UTC))
                for r in conn.execute(sa.select(s).order_by(s.c.alert_id, s.c.period))]


@pytest.fixture
def acme(engine: Engine) -> Iterator[int]:
    """Tenant ``acme`` with an amount alert at 50000 JPY (no estimate yet)."""
    with engine.begin() as conn:
        tid = add_tenant(conn, "acme")
    set_alert(engine, "acme", "amount", "50000")
    yield tid


def test_one_event_for_a_crossing_over_many_hourly_evaluations(engine: Engine,
                                                               acme: int) -> None:
    totals = [40000, 45000, 49999, 50000, 52000, 55000, 61000] + [61000 + i for i in range(20)]
    for i, total in enumerate(totals):
        counts = run(engine, [estimate("acme", acme, hour(i), total=total)], as_of=hour(i))
        assert counts["alerts_evaluated"] == 1
    got = events(engine)
    assert [e["type"] for e in got] == ["usage.threshold"]
    assert got[0]["data"]["as_of"] == hour(3).isoformat()  # 50000 ≥ 50000: crossed there
    assert got[0]["data"]["value"] == "50000"
    # the state follows the projection; only the crossing was announced
    assert states(engine) == [(PERIOD, True, 1, Decimal(totals[-1]), hour(len(totals) - 1))]


def test_cleared_once_on_the_way_down(engine: Engine, acme: int) -> None:
    for i, total in enumerate([60000, 60000, 49000, 30000, 30000, 49999]):
        run(engine, [estimate("acme", acme, hour(i), total=total)], as_of=hour(i))
    got = events(engine)
    assert [(e["type"], e["data"]["crossing"], e["data"]["as_of"]) for e in got] == [
        ("usage.threshold", 1, hour(0).isoformat()),
        ("usage.threshold_cleared", 1, hour(2).isoformat()),
    ]
    assert states(engine) == [(PERIOD, False, 1, Decimal(49999), hour(5))]


def test_a_second_crossing_is_a_new_event_with_a_new_id(engine: Engine, acme: int) -> None:
    for i, total in enumerate([55000, 40000, 56000, 57000]):
        run(engine, [estimate("acme", acme, hour(i), total=total)], as_of=hour(i))
    got = events(engine)
    assert [(e["type"], e["data"]["crossing"]) for e in got] == [
        ("usage.threshold", 1), ("usage.threshold_cleared", 1), ("usage.threshold", 2)]
    assert len({e["id"] for e in got}) == 3
    assert got[2]["data"]["value"] == "56000"


def test_a_rerun_of_the_same_hour_sends_nothing_again(engine: Engine, acme: int) -> None:
    row = estimate("acme", acme, hour(0), total=70000)
    assert run(engine, [row], as_of=hour(0))["alerts_crossed"] == 1
    before = states(engine)
    counts = run(engine, [row], as_of=hour(0))
    assert (counts["alerts_crossed"], counts["alerts_cleared"]) == (0, 0)
    assert len(events(engine)) == 1
    assert states(engine) == before


def test_the_same_hour_rerun_lower_clears(engine: Engine, acme: int) -> None:
    """A rerun of the hour that crossed (same as_of, the estimate replaced) is the latest
    word: it takes the alert back down."""
    run(engine, [estimate("acme", acme, hour(5), total=70000)], as_of=hour(5))
    run(engine, [estimate("acme", acme, hour(5), total=20000)], as_of=hour(5))
    assert [e["type"] for e in events(engine)] == ["usage.threshold", "usage.threshold_cleared"]


def test_an_older_as_of_changes_nothing(engine: Engine, acme: int) -> None:
    run(engine, [estimate("acme", acme, hour(10), total=70000)], as_of=hour(10))
    before = states(engine)
    # a backfill of an earlier hour, under the threshold: today's state stays crossed
    counts = run(engine, [estimate("acme", acme, hour(3), total=100)], as_of=hour(3))
    assert counts == {"alerts_evaluated": 0, "alerts_crossed": 0, "alerts_cleared": 0,
                      "alerts_stale": 1, "webhook_deliveries": 0}
    assert states(engine) == before
    assert [e["type"] for e in events(engine)] == ["usage.threshold"]
    # and an older hour over the threshold does not cross an alert that is under now
    run(engine, [estimate("acme", acme, hour(11), total=100)], as_of=hour(11))
    run(engine, [estimate("acme", acme, hour(4), total=90000)], as_of=hour(4))
    assert [e["type"] for e in events(engine)] == ["usage.threshold", "usage.threshold_cleared"]
    assert states(engine) == [(PERIOD, False, 1, Decimal(100), hour(11))]


def test_complete_clears_a_tenant_that_has_no_estimate_any_more(engine: Engine,
                                                                acme: int) -> None:
    with engine.begin() as conn:
        globex = add_tenant(conn, "globex")
    set_alert(engine, "globex", "standard_units", "3")
    run(engine, [estimate("acme", acme, hour(0), total=70000),
                 estimate("globex", globex, hour(0), total=9000, std=5)], as_of=hour(0))
    assert len(events(engine)) == 2
    # not complete (e.g. one tenant re-estimated): a missing tenant is not touched
    run(engine, [estimate("globex", globex, hour(1), total=9000, std=5)], as_of=hour(1))
    assert len(events(engine)) == 2
    # complete: acme's paid hours are gone, its projection is 0
    counts = run(engine, [estimate("globex", globex, hour(2), total=9000, std=5)],
                 as_of=hour(2), complete=True)
    assert (counts["alerts_cleared"], counts["alerts_crossed"]) == (1, 0)
    cleared = events(engine)[-1]
    assert (cleared["type"], cleared["tenant"]) == ("usage.threshold_cleared", "acme")
    assert cleared["data"] == {
        "period": PERIOD, "measure": "amount", "threshold": "50000", "value": "0",
        "currency": "JPY", "as_of": hour(2).isoformat(), "crossing": 1,
        "projected": {"standard_units": 0, "micro_units": 0, "total": "0"},
        "month_to_date": {"standard_units": 0, "micro_units": 0, "total": "0"},
    }
    # and complete again sends nothing more
    run(engine, [estimate("globex", globex, hour(3), total=9000, std=5)], as_of=hour(3),
        complete=True)
    assert len(events(engine)) == 3


def test_the_payload(engine: Engine, acme: int) -> None:
    row = estimate("acme", acme, hour(0), total=54990, std=30, micro=2)
    run(engine, [row], as_of=hour(0))
    [e] = events(engine)
    assert e["type"] == "usage.threshold"
    assert e["tenant"] == "acme"
    assert e["data"] == {
        "period": PERIOD, "measure": "amount", "threshold": "50000", "value": "54990",
        "currency": "JPY", "as_of": hour(0).isoformat(), "crossing": 1,
        "projected": {"standard_units": 30, "micro_units": 2, "total": "54990"},
        "month_to_date": {"standard_units": 29, "micro_units": 2, "total": "27495"},
    }


@pytest.mark.parametrize(("measure", "threshold", "value", "crossed"), [
    ("amount", "50000", {"total": 50000}, True),            # equal crosses (≥)
    ("amount", "50000", {"total": 49999}, False),
    ("standard_units", "30", {"std": 30, "total": 1}, True),
    ("standard_units", "30", {"std": 29, "total": 10**9}, False),  # other measures ignored
    ("micro_units", "4", {"micro": 4, "total": 1}, True),
    ("micro_units", "4", {"micro": 3, "total": 1}, False),
])
def test_crossing_is_value_at_or_over_the_threshold(engine: Engine, measure: str,
                                                     threshold: str, value: dict[str, int],
                                                     crossed: bool) -> None:
    with engine.begin() as conn:
        tid = add_tenant(conn, "acme")
    set_alert(engine, "acme", measure, threshold)
    run(engine, [estimate("acme", tid, hour(0), **value)], as_of=hour(0))
    assert [e["type"] for e in events(engine)] == (["usage.threshold"] if crossed else [])


def test_an_amount_is_compared_in_currency_units(engine: Engine, acme: int) -> None:
    """minor units → currency units exactly: 5000 cents is 50.00, under 50000 (units)."""
    run(engine, [estimate("acme", acme, hour(0), total=5_000_000, minor_units=2,
                          currency="USD")], as_of=hour(0))
    [e] = events(engine)
    assert (e["data"]["value"], e["data"]["threshold"], e["data"]["currency"]) == (
        "50000.00", "50000.00", "USD")
    run(engine, [estimate("acme", acme, hour(1), total=4_999_999, minor_units=2,
                          currency="USD")], as_of=hour(1))
    assert events(engine)[-1]["data"]["value"] == "49999.99"
    assert events(engine)[-1]["type"] == "usage.threshold_cleared"


def test_a_new_period_starts_with_no_state(engine: Engine, acme: int) -> None:
    run(engine, [estimate("acme", acme, hour(0), total=70000)], as_of=hour(0))
    first = datetime(2026, 10, 31, 15, tzinfo=UTC)  # 2026-11-01 00:00 in Tokyo
    # the first estimate of the month is under: the month's change sends nothing
    run(engine, [estimate("acme", acme, first, total=1000, period=NEXT)], as_of=first,
        period=NEXT, complete=True)
    assert [e["type"] for e in events(engine)] == ["usage.threshold"]
    run(engine, [estimate("acme", acme, first + timedelta(hours=1), total=80000,
                          period=NEXT)], as_of=first + timedelta(hours=1), period=NEXT)
    got = events(engine)
    assert [(e["type"], e["data"]["period"], e["data"]["crossing"]) for e in got] == [
        ("usage.threshold", PERIOD, 1), ("usage.threshold", NEXT, 1)]
    assert got[0]["id"] != got[1]["id"]


def test_set_raises_and_clears_at_once(engine: Engine, acme: int) -> None:
    with engine.begin() as conn:
        store(conn, estimate("acme", acme, hour(0), total=30000))
        store(conn, estimate("acme", acme, hour(1), total=42000))  # the latest
    got = set_alert(engine, "acme", "amount", "45000", now=hour(1) + timedelta(minutes=30))
    assert (got.created, got.previous, got.event, got.alert.crossed) == (
        False, Decimal(50000), None, False)
    assert events(engine) == []
    got = set_alert(engine, "acme", "amount", "42000", now=hour(1) + timedelta(minutes=31))
    assert (got.event, got.alert.crossed, got.alert.value, got.alert.as_of) == (
        "usage.threshold", True, Decimal(42000), hour(1))
    [e] = events(engine)
    assert (e["data"]["threshold"], e["data"]["value"], e["data"]["as_of"]) == (
        "42000", "42000", hour(1).isoformat())
    # the same threshold again: nothing
    assert set_alert(engine, "acme", "amount", "42000").event is None
    got = set_alert(engine, "acme", "amount", "42001", now=hour(1) + timedelta(minutes=32))
    assert (got.event, got.alert.crossed) == ("usage.threshold_cleared", False)
    # lowered again: a second crossing, a new event
    assert set_alert(engine, "acme", "amount", "100").event == "usage.threshold"
    got_events = events(engine)
    assert [(e["type"], e["data"]["crossing"]) for e in got_events] == [
        ("usage.threshold", 1), ("usage.threshold_cleared", 1), ("usage.threshold", 2)]
    with engine.connect() as conn:
        [alert] = alerts.list_alerts(conn)
    assert (alert.threshold, alert.updated_by, alert.crossings) == (Decimal(100), ACTOR, 2)


def test_set_with_no_estimate_this_period_has_nothing_to_compare(engine: Engine,
                                                                  acme: int) -> None:
    with engine.begin() as conn:  # last month's estimate does not count
        store(conn, estimate("acme", acme, datetime(2026, 9, 20, tzinfo=UTC), total=10**6,
                             period="2026-09"))
    got = set_alert(engine, "acme", "amount", "1000")
    assert (got.estimated, got.event, got.alert.period) == (False, None, None)
    assert events(engine) == [] and states(engine) == []


def test_set_does_not_override_a_newer_state(engine: Engine, acme: int) -> None:
    """The latest stored estimate is older than the state (complete=True found the tenant
    gone an hour later): lowering the threshold does not resurrect the old projection."""
    with engine.begin() as conn:
        store(conn, estimate("acme", acme, hour(0), total=70000))
    run(engine, [estimate("acme", acme, hour(0), total=70000)], as_of=hour(0))
    run(engine, [], as_of=hour(1), complete=True)
    assert [e["type"] for e in events(engine)] == ["usage.threshold", "usage.threshold_cleared"]
    assert set_alert(engine, "acme", "amount", "60000").event is None
    assert len(events(engine)) == 2


def test_remove_sends_nothing_and_a_new_alert_crosses_anew(engine: Engine, acme: int) -> None:
    with engine.begin() as conn:
        store(conn, estimate("acme", acme, hour(0), total=70000))
    assert set_alert(engine, "acme", "amount", "60000").event == "usage.threshold"
    with engine.begin() as conn:
        assert alerts.remove_alert(conn, tenant="acme", measure="amount") == ["amount"]
        assert alerts.remove_alert(conn, tenant="acme", measure="amount") == []
    assert len(events(engine)) == 1 and states(engine) == []
    # a new alert (SQLite may give it the removed one's id) crosses anew: a new event
    got = set_alert(engine, "acme", "amount", "60000", now=T0 + timedelta(hours=2))
    assert got.event == "usage.threshold" and got.created
    first, second = events(engine)
    assert first["id"] != second["id"]


def test_remove_all(engine: Engine, acme: int) -> None:
    set_alert(engine, "acme", "micro_units", "2")
    set_alert(engine, "acme", "standard_units", "20")
    with engine.begin() as conn:
        assert alerts.remove_alert(conn, tenant="acme") == [
            "amount", "standard_units", "micro_units"]
        assert alerts.list_alerts(conn) == []


def test_rollback_leaves_neither_state_nor_event(engine: Engine, acme: int) -> None:
    with engine.connect() as conn, conn.begin() as tx:
        counts = alerts.evaluate(conn, period=PERIOD, as_of=hour(0),
                                 estimates=[estimate("acme", acme, hour(0), total=90000)],
                                 now=hour(0), run_id=None, complete=False)
        assert counts["alerts_crossed"] == 1
        tx.rollback()
    assert events(engine) == [] and states(engine) == []
    # the rolled-back crossing is announced by the next evaluation that commits
    run(engine, [estimate("acme", acme, hour(0), total=90000)], as_of=hour(0))
    assert [e["type"] for e in events(engine)] == ["usage.threshold"]


def test_an_enabled_endpoint_gets_a_delivery(engine: Engine, acme: int) -> None:
    ep = n.webhook_endpoints
    with engine.begin() as conn:
        other = add_tenant(conn, "globex")
        for tenant_id, enabled in ((acme, True), (None, True), (acme, False), (other, True)):
            conn.execute(sa.insert(ep).values(
                tenant_id=tenant_id, url="http://127.0.0.1:9/hook", secret="s3cret",
                enabled=enabled, created_at=T0, created_by=ACTOR))
    counts = run(engine, [estimate("acme", acme, hour(0), total=90000)], as_of=hour(0))
    assert counts["webhook_deliveries"] == 2  # acme's enabled endpoint and the global one
    d, e = n.webhook_deliveries, n.outbox_events
    with engine.connect() as conn:
        rows = conn.execute(sa.select(d.c.endpoint_id, d.c.status, ep.c.tenant_id, e.c.type)
                            .join(ep, ep.c.id == d.c.endpoint_id)
                            .join(e, e.c.id == d.c.event_pk)
                            .order_by(d.c.endpoint_id)).all()
    assert [(r.status, r.tenant_id, r.type) for r in rows] == [
        ("pending", acme, "usage.threshold"), ("pending", None, "usage.threshold")]


def test_event_ids_follow_the_documented_key(engine: Engine, acme: int) -> None:
    run(engine, [estimate("acme", acme, hour(0), total=90000)], as_of=hour(0))
    with engine.connect() as conn:
        [alert] = alerts.list_alerts(conn, ["acme"])
    created = int(alert.created_at.timestamp() * 1_000_000)
    key = f"usage.threshold:acme:{alert.id}.{created}:{PERIOD}:1"
    assert events(engine)[0]["id"] == event_id(key)


def test_list_shows_each_alerts_latest_period(engine: Engine, acme: int) -> None:
    with engine.begin() as conn:
        add_tenant(conn, "globex")
    set_alert(engine, "globex", "standard_units", "7")
    run(engine, [estimate("acme", acme, hour(0), total=90000)], as_of=hour(0))
    first = datetime(2026, 10, 31, 15, tzinfo=UTC)
    run(engine, [estimate("acme", acme, first, total=10, period=NEXT)], as_of=first,
        period=NEXT)
    with engine.connect() as conn:
        got = alerts.list_alerts(conn)
        assert [a.tenant for a in alerts.list_alerts(conn, ["globex"])] == ["globex"]
        with pytest.raises(UnknownTenant):
            alerts.list_alerts(conn, ["nobody"])
    assert [(a.tenant, a.measure, a.period, a.crossed, a.crossings, a.value) for a in got] == [
        ("acme", "amount", NEXT, False, 0, Decimal(10)),
        ("globex", "standard_units", None, False, 0, None),
    ]
    assert got[0].to_json()["threshold"] == "50000"


def test_set_refuses_an_unknown_tenant_and_a_bad_threshold(engine: Engine) -> None:
    with engine.begin() as conn:
        add_tenant(conn, "acme")
    with pytest.raises(UnknownTenant):
        set_alert(engine, "nobody", "amount", "100")
    with pytest.raises(InvalidThreshold):
        set_alert(engine, "acme", "amount", "-1")
    with pytest.raises(InvalidThreshold):
        set_alert(engine, "acme", "amount", "100.5")  # JPY has no decimals
    with engine.connect() as conn:
        assert alerts.list_alerts(conn) == []


@pytest.mark.parametrize(("measure", "text", "minor", "says"), [
    ("amount", "-5", 0, "must not be negative"),
    ("amount", "0", 0, "greater than zero"),
    ("amount", "abc", 0, "is not a number"),
    ("amount", "1e3", 0, "is not a number"),
    ("amount", "NaN", 0, "is not a number"),
    ("amount", "", 0, "is not a number"),
    ("amount", "50000.5", 0, "JPY has no decimals"),
    ("amount", "12.345", 2, "has 2 decimal(s)"),
    ("amount", "1000000000000", 0, "must be below 1000000000000"),
    ("standard_units", "2.5", 0, "units are whole numbers"),
    ("micro_units", "-1", 0, "must not be negative"),
    ("bogus", "1", 0, "unknown alert measure"),
])
def test_parse_threshold_refuses(measure: str, text: str, minor: int, says: str) -> None:
    with pytest.raises(InvalidThreshold) as info:
        alerts.parse_threshold(measure, text, minor_units=minor, currency="JPY")
    assert says in str(info.value)


@pytest.mark.parametrize(("measure", "text", "minor", "value"), [
    ("amount", "50000", 0, Decimal(50000)),
    ("amount", "50000.00", 0, Decimal(50000)),
    ("amount", "12.3", 2, Decimal("12.30")),
    ("amount", "999999999999.99", 2, Decimal("999999999999.99")),
    ("standard_units", "30", 0, Decimal(30)),
    ("standard_units", " 7 ", 0, Decimal(7)),
])
def test_parse_threshold_accepts(measure: str, text: str, minor: int, value: Decimal) -> None:
    assert alerts.parse_threshold(measure, text, minor_units=minor) == value


def test_a_large_threshold_round_trips_exactly(engine: Engine) -> None:
    """15 significant digits survive SQLite's NUMERIC (a double) and compare exactly."""
    with engine.begin() as conn:
        tid = add_tenant(conn, "big")
    set_alert(engine, "big", "amount", "999999999999")
    with engine.connect() as conn:
        [a] = alerts.list_alerts(conn)
    assert a.threshold == Decimal("999999999999")
    run(engine, [estimate("big", tid, hour(0), total=999_999_999_998)], as_of=hour(0))
    run(engine, [estimate("big", tid, hour(1), total=999_999_999_999)], as_of=hour(1))
    assert [(e["type"], e["data"]["as_of"]) for e in events(engine)] == [
        ("usage.threshold", hour(1).isoformat())]


def _statements(engine: Engine, tenants: int, offset: int) -> tuple[int, dict[str, int]]:
    rows = []
    with engine.begin() as conn:
        for i in range(tenants):
            key = f"t{offset + i:05d}"
            tid = add_tenant(conn, key)
            alerts.set_alert(conn, tenant=key, measure="amount", threshold=Decimal(100),
                             now=T0, actor=ACTOR, zone=ZONE)
            rows.append(estimate(key, tid, hour(0), total=100 + i % 2))
    seen: list[str] = []

    def count(*_: Any) -> None:
        seen.append("x")

    with engine.begin() as conn:
        sa.event.listen(conn, "before_cursor_execute", count)
        counts = alerts.evaluate(conn, period=PERIOD, as_of=hour(0), estimates=rows,
                                 now=hour(0), run_id=None, complete=False)
        sa.event.remove(conn, "before_cursor_execute", count)
    return len(seen), counts


@pytest.mark.slow
def test_statements_do_not_grow_with_tenants(engine: Engine) -> None:
    small, c1 = _statements(engine, 5, 0)
    large, c2 = _statements(engine, 1500, 100)  # beyond the IN-list bound
    assert c1["alerts_crossed"] == 5 and c2["alerts_crossed"] == 1500
    assert c2["alerts_evaluated"] == 1500  # the other 5 tenants' alerts were not evaluated
    assert large == small
