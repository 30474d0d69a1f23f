"""Versioned pricing catalogs: ``billing/catalogs/<version>.toml``.

Every billing rule that is a number lives in a catalog, not in code: unit prices, tax, currency,
per-host metric limits, tenant limits, the anomaly-detection divisor, the free-plan host limit
and the minimum charge. The catalog in force on the first day of a billed month (the one with the
latest ``effective_from`` on or before that day) prices the whole month.

Loading validates every field and fails with :class:`~billing.errors.CatalogError` naming the
file and the field.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any

from billing.errors import CatalogError
from metering.timeutil import parse_period

__all__ = ["CATALOG_DIR", "Catalog", "catalog_for", "load_catalog", "load_catalogs"]

CATALOG_DIR = Path(__file__).resolve().parent / "catalogs"
_CURRENCY = re.compile(r"^[A-Z]{3}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Catalog:
    """One catalog version. Prices are integers in the currency's minor unit."""

    version: str
    effective_from: date
    currency: str
    minor_units: int
    tax_rate: Fraction
    prices_include_tax: bool
    standard_unit_price: int
    micro_unit_price: int
    standard_host_metrics: int
    micro_host_metrics: int
    service_metrics: int
    external_monitors: int
    anomaly_detection_hosts_per_unit: int
    free_plan_hosts: int
    minimum_standard_units: int
    source: str = ""


def _get(doc: dict[str, Any], dotted: str, source: str) -> Any:
    node: Any = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise CatalogError(f"{source}: missing field {dotted!r}", file=source, field=dotted)
        node = node[part]
    return node


def _int(doc: dict[str, Any], dotted: str, source: str, *, minimum: int = 0) -> int:
    value = _get(doc, dotted, source)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CatalogError(
            f"{source}: field {dotted!r} must be an integer >= {minimum}, got {value!r}",
            file=source, field=dotted,
        )
    return value


def _rate(doc: dict[str, Any], dotted: str, source: str) -> Fraction:
    value = _get(doc, dotted, source)
    try:
        if not isinstance(value, str):
            raise InvalidOperation
        rate = Fraction(Decimal(value))
    except (InvalidOperation, ValueError):
        raise CatalogError(
            f"{source}: field {dotted!r} must be a decimal string such as \"0.10\" "
            f"(never a float), got {value!r}",
            file=source, field=dotted,
        ) from None
    if not 0 <= rate < 1:
        raise CatalogError(f"{source}: field {dotted!r} must be in [0, 1), got {value!r}",
                           file=source, field=dotted)
    return rate


def load_catalog(path: Path) -> Catalog:
    """Load and validate one catalog file."""
    source = str(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"{source}: cannot read catalog: {exc.strerror}", file=source) from exc
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{source}: not valid TOML: {exc}", file=source) from exc

    version = _get(doc, "version", source)
    if not isinstance(version, str) or not version:
        raise CatalogError(f"{source}: field 'version' must be a non-empty string",
                           file=source, field="version")
    raw_from = _get(doc, "effective_from", source)
    try:
        effective = raw_from if isinstance(raw_from, date) else date.fromisoformat(str(raw_from))
    except ValueError:
        raise CatalogError(
            f"{source}: field 'effective_from' must be a date YYYY-MM-DD, got {raw_from!r}",
            file=source, field="effective_from",
        ) from None
    currency = _get(doc, "currency", source)
    if not isinstance(currency, str) or not _CURRENCY.match(currency):
        raise CatalogError(
            f"{source}: field 'currency' must be an ISO 4217 code such as JPY, got {currency!r}",
            file=source, field="currency",
        )
    include = _get(doc, "tax.prices_include_tax", source)
    if not isinstance(include, bool):
        raise CatalogError(
            f"{source}: field 'tax.prices_include_tax' must be true or false, got {include!r}",
            file=source, field="tax.prices_include_tax",
        )
    return Catalog(
        version=version,
        effective_from=effective,
        currency=currency,
        minor_units=_int(doc, "minor_units", source),
        tax_rate=_rate(doc, "tax.rate", source),
        prices_include_tax=include,
        standard_unit_price=_int(doc, "prices.standard_unit", source, minimum=1),
        micro_unit_price=_int(doc, "prices.micro_unit", source, minimum=1),
        standard_host_metrics=_int(doc, "limits.standard_host_metrics", source, minimum=1),
        micro_host_metrics=_int(doc, "limits.micro_host_metrics", source, minimum=1),
        service_metrics=_int(doc, "limits.service_metrics", source, minimum=1),
        external_monitors=_int(doc, "limits.external_monitors", source, minimum=1),
        anomaly_detection_hosts_per_unit=_int(
            doc, "limits.anomaly_detection_hosts_per_unit", source, minimum=1
        ),
        free_plan_hosts=_int(doc, "limits.free_plan_hosts", source),
        minimum_standard_units=_int(doc, "minimum_charge.standard_units", source),
        source=source,
    )


def load_catalogs(directory: Path | None = None) -> list[Catalog]:
    """Every catalog in ``directory`` (default: the ones shipped in the package), oldest first."""
    folder = directory or CATALOG_DIR
    paths = sorted(folder.glob("*.toml"))
    if not paths:
        raise CatalogError(f"{folder}: no catalog files (*.toml)", file=str(folder))
    catalogs = sorted((load_catalog(p) for p in paths), key=lambda c: c.effective_from)
    seen: dict[date, str] = {}
    for c in catalogs:
        if c.effective_from in seen:
            raise CatalogError(
                f"{c.source}: field 'effective_from' {c.effective_from} is also the start of "
                f"catalog {seen[c.effective_from]}",
                file=c.source, field="effective_from",
            )
        seen[c.effective_from] = c.version
    return catalogs


def catalog_for(period: str, catalogs: Sequence[Catalog] | None = None) -> Catalog:
    """The catalog in force on the first day of ``period`` (``YYYY-MM``)."""
    year, month = parse_period(period)
    first = date(year, month, 1)
    found = [c for c in (catalogs if catalogs is not None else load_catalogs())
             if c.effective_from <= first]
    if not found:
        raise CatalogError(f"no catalog is in force on {first} (period {period})",
                           period=period)
    return max(found, key=lambda c: c.effective_from)
