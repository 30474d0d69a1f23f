"""Invoices as documents: the JSON shape of ``hostmeter billing show`` (DESIGN.md) and CSV rows.

Money leaves hostmeter as decimal strings in the currency's units, never as floats.

The CSV export is opened in spreadsheets, where a cell that begins with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return is read as a formula (CSV injection). Tenant keys are chosen by
customers, so every **text** column (:data:`CSV_TEXT_COLUMNS`: period, tenant, status, currency,
catalog, content_hash) is neutralized the OWASP way: such a cell gets a leading ``'``
(``=HYPERLINK(…)`` → ``'=HYPERLINK(…)``). The **numeric** columns (revision, units, amounts,
adjusts_revision) are written by hostmeter from integers and stay exact numbers: a credit
adjustment is ``-500``, not ``'-500``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from billing.repository import StoredInvoice
from billing.rules import format_money

__all__ = [
    "CSV_COLUMNS",
    "CSV_TEXT_COLUMNS",
    "csv_rows",
    "csv_text",
    "invoice_document",
    "period_document",
]


def invoice_document(inv: StoredInvoice) -> dict[str, Any]:
    """One revision as the JSON object of ``billing show --format json``."""
    money = lambda v: format_money(int(v), inv.minor_units)  # noqa: E731
    return {
        "tenant": inv.tenant,
        "revision": inv.revision,
        "status": inv.status,
        "currency": inv.currency,
        "catalog": inv.catalog_version,
        "standard_units": inv.standard_units,
        "micro_units": inv.micro_units,
        "subtotal": money(inv.subtotal),
        "tax": money(inv.tax),
        "total": money(inv.total),
        "content_hash": inv.content_hash,
        "created_at": inv.created_at.isoformat(),
        "created_by": inv.created_by,
        "reason": inv.reason,
        "finalized_at": inv.finalized_at.isoformat() if inv.finalized_at else None,
        "lines": [
            {"item": ln["item"], "unit": ln["unit"], "units": ln["units"],
             "unit_price": money(ln["unit_price"]), "amount": money(ln["amount"]),
             "basis": ln["basis"]}
            for ln in inv.lines
        ],
        "adjustments": [
            {"adjusts_revision": a["adjusts_revision"],
             "standard_units": a["standard_units"], "micro_units": a["micro_units"],
             "amount": money(a["amount"]), "tax": money(a["tax"]), "reason": a["reason"],
             "created_at": a["created_at"].isoformat(), "created_by": a["created_by"]}
            for a in inv.adjustments
        ],
    }


def period_document(period: str, invoices: Iterable[StoredInvoice]) -> dict[str, Any]:
    return {"period": period, "invoices": [invoice_document(i) for i in invoices]}


CSV_COLUMNS = (
    "period", "tenant", "revision", "status", "currency", "catalog", "standard_units",
    "micro_units", "subtotal", "tax", "total", "adjustment", "adjusts_revision", "content_hash",
)


CSV_TEXT_COLUMNS = frozenset({"period", "tenant", "status", "currency", "catalog",
                              "content_hash"})
"""Columns holding text (neutralized against formulas); all others hold exact numbers."""

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str) -> str:
    """A text cell a spreadsheet will not evaluate: ``'`` before a formula-like start."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def csv_rows(period: str, invoices: Iterable[StoredInvoice]) -> Iterable[list[Any]]:
    """One row per revision (accounting export); text cells neutralized (see the module)."""
    for inv in invoices:
        adj = inv.adjustments[0] if inv.adjustments else None
        row = [
            period, inv.tenant, inv.revision, inv.status, inv.currency, inv.catalog_version,
            inv.standard_units, inv.micro_units, format_money(inv.subtotal, inv.minor_units),
            format_money(inv.tax, inv.minor_units), format_money(inv.total, inv.minor_units),
            format_money(adj["amount"], inv.minor_units) if adj else "",
            adj["adjusts_revision"] if adj else "", inv.content_hash,
        ]
        yield [csv_text(str(v)) if col in CSV_TEXT_COLUMNS else v
               for col, v in zip(CSV_COLUMNS, row, strict=True)]
