"""BILLING_RULES.md as a table: every worked example and the edges, through the pure rules."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest

from billing.catalog import catalog_for
from billing.rules import MonthSums, ceil_div, format_money, rate

CATALOG = catalog_for("2026-10")
N31, N30, N29, N28 = 744, 720, 696, 672


def month(n: int = N31, paid: int | None = None, roles: dict[str, int] | None = None,
          **hourly: int) -> MonthSums:
    """Constant usage in every paid hour: ``hourly`` per-hour values × paid hours."""
    paid = n if paid is None else paid
    fields = {k: v * paid for k, v in hourly.items()}
    return MonthSums(tenant="t", hours_in_month=n, paid_hours=paid,
                     roles=tuple((r, h * paid) for r, h in (roles or {}).items()), **fields)


def units(sums: MonthSums) -> dict[str, int]:
    return {ln.item: ln.units for ln in rate(sums, CATALOG).lines}


# Pattern A: hosts with 180, 180 metrics, micro 20, service 90, monitors 19.
PATTERN_A = month(standard_hosts=2, micro_hosts=1, service_metrics=90, monitors=19)
# Pattern B: 401 and 180 metrics → OS = 201; micro 50 → OU = 20; service 240; monitors 30.
PATTERN_B = month(standard_hosts=2, standard_overage=201, micro_hosts=1, micro_overage=20,
                  service_metrics=240, monitors=30)


@pytest.mark.parametrize(
    ("name", "sums", "expected_units", "std", "micro", "total", "tax"),
    [
        ("pattern A", PATTERN_A, {"standard_hosts": 2, "micro_hosts": 1}, 2, 1, 4326, 393),
        ("pattern B", PATTERN_B,
         {"standard_hosts": 2, "standard_host_metric_overage": 2, "micro_hosts": 1,
          "micro_host_metric_overage": 1, "service_metric_overage": 1,
          "external_monitor_overage": 1}, 6, 2, 12318, 1119),
        ("exactly 3 hosts every hour", month(standard_hosts=3), {"standard_hosts": 3}, 3, 0,
         5499, 499),
        ("anomaly role with 6 hosts", month(standard_hosts=6, roles={"web:app": 6}),
         {"standard_hosts": 6, "anomaly_detection": 2}, 8, 0, 14664, 1333),
        ("two roles, a host in both counts in both",
         month(standard_hosts=5, roles={"web:app": 5, "db": 1}),
         {"standard_hosts": 5, "anomaly_detection": 2}, 7, 0, 12831, 1166),
        ("an average that is an exact integer: 200 metrics over is 1 unit",
         month(standard_hosts=1, standard_overage=200), {"standard_hosts": 1,
                                                         "standard_host_metric_overage": 1},
         2, 0, 3666, 333),
        ("service metrics exactly at the limit are free", month(standard_hosts=1,
                                                                service_metrics=200),
         {"standard_hosts": 1}, 1, 0, 1833, 166),
        ("monitors exactly at the limit are free", month(standard_hosts=1, monitors=20),
         {"standard_hosts": 1}, 1, 0, 1833, 166),
        ("monitors 41 → ⌈21/20⌉ = 2", month(standard_hosts=1, monitors=41),
         {"standard_hosts": 1, "external_monitor_overage": 2}, 3, 0, 5499, 499),
    ],
)
def test_worked_examples(name: str, sums: MonthSums, expected_units: dict[str, int], std: int,
                         micro: int, total: int, tax: int) -> None:
    r = rate(sums, CATALOG)
    assert units(sums) == expected_units, name
    assert (r.standard_units, r.micro_units, r.total, r.tax) == (std, micro, total, tax), name
    assert r.subtotal == r.total - r.tax
    assert sum(ln.amount for ln in r.lines) == r.total


def test_average_of_3_point_2_hosts_is_4_units() -> None:
    # 3 hosts all month plus a fourth for a fifth of the hours: 3.2 on average → 4.
    sums = MonthSums(tenant="t", hours_in_month=N30, paid_hours=N30,
                     standard_hosts=3 * N30 + N30 // 5)
    assert units(sums) == {"standard_hosts": 4}


@pytest.mark.parametrize(
    ("n", "label"), [(N28, "28 days"), (N29, "29 days (February 2028)"), (N30, "30 days"),
                     (N31, "31 days")],
)
def test_month_lengths_divide_by_every_hour_of_the_month(n: int, label: str) -> None:
    # 5 hosts from the 15th: (days - 14) × 24 paid hours.
    paid = n - 14 * 24
    sums = MonthSums(tenant="t", hours_in_month=n, paid_hours=paid, standard_hosts=5 * paid)
    expected = ceil_div(5 * paid, n)
    assert units(sums) == {"standard_hosts": expected}, label
    basis = rate(sums, CATALOG).lines[0].basis
    assert basis["hours_in_month"] == n and basis["paid_hours"] == paid
    assert Fraction(basis["average"]) == Fraction(5 * paid, n)


def test_first_month_proration_example() -> None:
    # 5 hosts from the 15th of a 31-day month → 5 × 17 × 24 / 744 = 2.74… → 3 units.
    paid = 17 * 24
    sums = MonthSums(tenant="t", hours_in_month=N31, paid_hours=paid, standard_hosts=5 * paid)
    line = rate(sums, CATALOG).lines[0]
    assert line.units == 3
    assert line.basis == {"hour_sum": 2040, "hours_in_month": 744, "average": "85/31",
                          "paid_hours": 408, "limit": None, "catalog": "2019-10"}


@pytest.mark.parametrize(
    ("name", "sums", "minimum"),
    [
        ("only monitors, under the limit → minimum charge",
         month(monitors=5), True),
        ("only service metrics → minimum charge", month(service_metrics=10), True),
        ("micro hosts only, no extras → no minimum charge", month(micro_hosts=2), False),
        ("micro hosts and monitors → minimum charge", month(micro_hosts=2, monitors=3), True),
        ("nothing at all on a paid plan → minimum charge", month(), True),
        ("a standard host → its line, no minimum", month(standard_hosts=1), False),
        ("no paid hour → nothing", month(paid=0, standard_hosts=3), False),
    ],
)
def test_minimum_charge_branches(name: str, sums: MonthSums, minimum: bool) -> None:
    r = rate(sums, CATALOG)
    items = [ln.item for ln in r.lines]
    assert ("minimum_charge" in items) is minimum, name
    if minimum:
        assert r.standard_units >= 1


def test_zero_usage_without_a_paid_hour_is_an_empty_invoice() -> None:
    r = rate(MonthSums(tenant="t", hours_in_month=N31, paid_hours=0), CATALOG)
    assert (r.lines, r.total, r.tax, r.standard_units, r.micro_units) == ((), 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("paid", "expected"),
    [(N31 // 2, 2), (N31 // 2 + 1, 3)],  # trial→standard and standard→free halfway
)
def test_plan_changes_prorate_through_paid_hours(paid: int, expected: int) -> None:
    sums = MonthSums(tenant="t", hours_in_month=N31, paid_hours=paid, standard_hosts=4 * paid)
    assert units(sums)["standard_hosts"] == expected


def test_overage_is_summed_over_hosts_before_dividing() -> None:
    # Two hosts each 100 over the limit: 200 summed → 1 unit (not 1 + 1).
    assert units(month(standard_hosts=2, standard_overage=200)) == {
        "standard_hosts": 2, "standard_host_metric_overage": 1}


def test_tax_exclusive_catalog() -> None:
    cat = dataclasses.replace(CATALOG, prices_include_tax=False)
    r = rate(PATTERN_A, cat)
    assert (r.subtotal, r.tax, r.total) == (4326, 432, 4758)


def test_content_hash_changes_with_content_only() -> None:
    a, b = rate(PATTERN_A, CATALOG), rate(PATTERN_A, CATALOG)
    assert a.content_hash == b.content_hash
    assert rate(PATTERN_B, CATALOG).content_hash != a.content_hash


def test_no_float_anywhere_in_a_rating() -> None:
    def walk(v: object) -> None:
        assert not isinstance(v, float), v
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)

    walk(rate(PATTERN_B, CATALOG).content())


@pytest.mark.parametrize(("a", "b", "q"), [(0, 5, 0), (1, 5, 1), (5, 5, 1), (6, 5, 2),
                                           (1488, 744, 2), (1489, 744, 3)])
def test_ceil_div(a: int, b: int, q: int) -> None:
    assert ceil_div(a, b) == q


def test_format_money() -> None:
    assert format_money(12318, 0) == "12318"
    assert format_money(1234, 2) == "12.34"
    assert format_money(-5, 0) == "-5"
