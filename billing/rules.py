"""The billing rules (BILLING_RULES.md §2–§4) as pure functions: month hour sums → invoice.

No I/O, no clock and no float: hour sums are integers, averages are exact
:class:`~fractions.Fraction` values, every "round up" is an integer ceiling division, and money
is integer minor units of the catalog's currency.

For a quantity Q with hour sum ``ΣQ`` over the paid hours of a month of ``N`` hours,
``avg(Q) = ΣQ / N`` and, for example, ``⌈avg(OS) / 200⌉ = ⌈ΣOS / (200·N)⌉`` — computed as the
latter, so no rounding ever happens before the final ceiling.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

from billing.catalog import Catalog

__all__ = ["Line", "MonthSums", "Rating", "ceil_div", "format_money", "rate", "to_decimal"]

STANDARD_ITEMS = (
    "standard_hosts",
    "standard_host_metric_overage",
    "service_metric_overage",
    "external_monitor_overage",
    "anomaly_detection",
)


def ceil_div(numerator: int, denominator: int) -> int:
    """⌈numerator / denominator⌉ for integers, denominator > 0."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    return -(-numerator // denominator)


def _ratio_text(numerator: int, denominator: int) -> str:
    """The exact fraction ``numerator / denominator`` (denominator > 0) in lowest terms, as
    text: ``"85/31"``, or ``"2"`` when it is whole. The text of ``Fraction(n, d)``, through one
    gcd (this runs for every line of every invoice)."""
    g = math.gcd(numerator, denominator)
    n, d = numerator // g, denominator // g
    return str(n) if d == 1 else f"{n}/{d}"


def to_decimal(amount: int, minor_units: int) -> Decimal:
    """Integer minor units → the amount in currency units, exactly (1234 cents → 12.34)."""
    return Decimal(int(amount)).scaleb(-int(minor_units)) if minor_units else Decimal(int(amount))


def format_money(amount: int, minor_units: int) -> str:
    """Integer minor units → decimal text: 12318 JPY → "12318"; 1234 (cents) → "12.34"."""
    return str(to_decimal(amount, minor_units))


@dataclass(frozen=True, slots=True, kw_only=True)
class MonthSums:
    """A tenant's hourly quantities summed over the **paid** hours of one month."""

    tenant: str
    hours_in_month: int
    paid_hours: int
    standard_hosts: int = 0
    micro_hosts: int = 0
    standard_overage: int = 0
    micro_overage: int = 0
    service_metrics: int = 0
    monitors: int = 0
    roles: tuple[tuple[str, int], ...] = ()
    free_max_hosts: int = 0
    """The most hosts in any free-plan hour (for the free-limit report, never billed)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Line:
    """One invoice line and the numbers that explain it."""

    item: str
    unit: str
    units: int
    unit_price: int
    amount: int
    basis: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rating:
    """What a tenant owes for a month under one catalog."""

    tenant: str
    catalog_version: str
    currency: str
    minor_units: int
    lines: tuple[Line, ...]
    standard_units: int
    micro_units: int
    subtotal: int
    tax: int
    total: int

    def content(self) -> dict[str, Any]:
        """Everything a customer sees, in a canonical form (what the content hash covers)."""
        return {
            "catalog": self.catalog_version,
            "currency": self.currency,
            "standard_units": self.standard_units,
            "micro_units": self.micro_units,
            "subtotal": self.subtotal,
            "tax": self.tax,
            "total": self.total,
            "lines": [
                {"item": ln.item, "unit": ln.unit, "units": ln.units,
                 "unit_price": ln.unit_price, "amount": ln.amount, "basis": ln.basis}
                for ln in self.lines
            ],
        }

    @property
    def content_hash(self) -> str:
        canonical = json.dumps(self.content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _basis(
    hour_sum: int, sums: MonthSums, catalog: Catalog, *, limit: int | None, **extra: Any
) -> dict[str, Any]:
    return {
        "hour_sum": hour_sum,
        "hours_in_month": sums.hours_in_month,
        "average": _ratio_text(hour_sum, sums.hours_in_month),
        "paid_hours": sums.paid_hours,
        "limit": limit,
        "catalog": catalog.version,
        **extra,
    }


def _over_limit_units(hour_sum: int, n: int, limit: int) -> int:
    """⌈max(0, ΣQ/N − limit) / limit⌉ without leaving the integers."""
    excess = hour_sum - limit * n
    return ceil_div(excess, limit * n) if excess > 0 else 0


def rate(sums: MonthSums, catalog: Catalog) -> Rating:
    """Apply BILLING_RULES.md §3–§4 to one tenant's month. A month with no paid hour rates to
    an empty invoice (total 0)."""
    n = sums.hours_in_month
    if n <= 0:
        raise ValueError("hours_in_month must be positive")
    lines: list[Line] = []
    paid = sums.paid_hours > 0

    def add(item: str, unit: str, units: int, basis: dict[str, Any]) -> None:
        if units > 0:
            price = catalog.standard_unit_price if unit == "standard" else catalog.micro_unit_price
            lines.append(Line(item=item, unit=unit, units=units, unit_price=price,
                              amount=units * price, basis=basis))

    if paid:
        s_lim, u_lim = catalog.standard_host_metrics, catalog.micro_host_metrics
        add("standard_hosts", "standard", ceil_div(sums.standard_hosts, n),
            _basis(sums.standard_hosts, sums, catalog, limit=None))
        add("standard_host_metric_overage", "standard",
            ceil_div(sums.standard_overage, s_lim * n),
            _basis(sums.standard_overage, sums, catalog, limit=s_lim))
        add("micro_hosts", "micro", ceil_div(sums.micro_hosts, n),
            _basis(sums.micro_hosts, sums, catalog, limit=None))
        add("micro_host_metric_overage", "micro", ceil_div(sums.micro_overage, u_lim * n),
            _basis(sums.micro_overage, sums, catalog, limit=u_lim))
        add("service_metric_overage", "standard",
            _over_limit_units(sums.service_metrics, n, catalog.service_metrics),
            _basis(sums.service_metrics, sums, catalog, limit=catalog.service_metrics))
        add("external_monitor_overage", "standard",
            _over_limit_units(sums.monitors, n, catalog.external_monitors),
            _basis(sums.monitors, sums, catalog, limit=catalog.external_monitors))
        per_unit = catalog.anomaly_detection_hosts_per_unit
        role_units = [(role, total, ceil_div(total, per_unit * n))
                      for role, total in sorted(sums.roles)]
        roles = [
            {"role": role, "hour_sum": total, "average": _ratio_text(total, n),
             "units": units}
            for role, total, units in role_units
        ]
        role_sum = sum(total for _, total, _ in role_units)
        add("anomaly_detection", "standard", sum(units for _, _, units in role_units),
            _basis(role_sum, sums, catalog, limit=per_unit, roles=roles))

        standard_lines = sum(ln.units for ln in lines if ln.item in STANDARD_ITEMS)
        micro_units = sum(ln.units for ln in lines if ln.unit == "micro")
        used_extras = sums.service_metrics > 0 or sums.monitors > 0
        if standard_lines == 0 and (used_extras or micro_units == 0):
            add("minimum_charge", "standard", catalog.minimum_standard_units,
                {"paid_hours": sums.paid_hours, "hours_in_month": n, "limit": None,
                 "catalog": catalog.version,
                 "rule": "any paid hour, every standard line 0, and service metrics or "
                         "monitors used or no micro-host units"})

    standard_units = sum(ln.units for ln in lines if ln.unit == "standard")
    micro_units = sum(ln.units for ln in lines if ln.unit == "micro")
    gross = sum(ln.amount for ln in lines)
    r = catalog.tax_rate
    if catalog.prices_include_tax:
        total = gross
        tax = math.floor(Fraction(total) * r / (1 + r))
        subtotal = total - tax
    else:
        subtotal = gross
        tax = math.floor(Fraction(subtotal) * r)
        total = subtotal + tax
    return Rating(
        tenant=sums.tenant,
        catalog_version=catalog.version,
        currency=catalog.currency,
        minor_units=catalog.minor_units,
        lines=tuple(lines),
        standard_units=standard_units,
        micro_units=micro_units,
        subtotal=subtotal,
        tax=tax,
        total=total,
    )
