"""Billing tables: invoices with revisions, their lines and adjustments, and the billing-run audit.

- ``invoices``: one row per (tenant, period, revision). ``status`` is ``draft``, ``final`` or
  ``void``. Amounts are integers in the currency's minor unit. ``content_hash`` covers everything
  the customer sees, so an unchanged recomputation is recognised and writes nothing.
- ``invoice_lines``: the lines of one revision; ``basis`` (JSON) explains each number.
- ``invoice_adjustments``: when a final invoice's content changes, the new draft revision carries
  an adjustment: the signed difference against the final revision it refers to.
- ``billing_runs``: every close, rerun and finalize: when, who (user@host), why, the catalog,
  whether it was a dry run, what it wrote and what failed.

Final and void invoices (and their lines) are immutable: database triggers (migration 0002)
refuse any UPDATE or DELETE of them, in addition to the checks in ``billing.invoices``.
"""

from __future__ import annotations

import sqlalchemy as sa

from metering.db import UTCDateTime, metadata

__all__ = ["INVOICE_STATUSES", "billing_runs", "invoice_adjustments", "invoice_lines", "invoices"]

INVOICE_STATUSES = ("draft", "final", "void")

invoices = sa.Table(
    "invoices",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("period", sa.String(7), nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("status", sa.String(8), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("catalog_version", sa.String(32), nullable=False),
    sa.Column("standard_units", sa.Integer, nullable=False),
    sa.Column("micro_units", sa.Integer, nullable=False),
    sa.Column("subtotal", sa.BigInteger, nullable=False),
    sa.Column("tax", sa.BigInteger, nullable=False),
    sa.Column("total", sa.BigInteger, nullable=False),
    sa.Column("minor_units", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("created_by", sa.String(255), nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("finalized_at", UTCDateTime, nullable=True),
    sa.Column("voided_at", UTCDateTime, nullable=True),
    sa.UniqueConstraint("tenant_id", "period", "revision"),
    sa.CheckConstraint("status IN ('draft', 'final', 'void')", name="status"),
    sa.Index("ix_invoices_period_status", "period", "status"),
)

invoice_lines = sa.Table(
    "invoice_lines",
    metadata,
    sa.Column("invoice_id", sa.Integer, sa.ForeignKey("invoices.id"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("item", sa.String(64), nullable=False),
    sa.Column("unit", sa.String(8), nullable=False),
    sa.Column("units", sa.Integer, nullable=False),
    sa.Column("unit_price", sa.BigInteger, nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("basis", sa.JSON, nullable=False),
)

invoice_adjustments = sa.Table(
    "invoice_adjustments",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("invoice_id", sa.Integer, sa.ForeignKey("invoices.id"), nullable=False),
    sa.Column("adjusts_invoice_id", sa.Integer, sa.ForeignKey("invoices.id"), nullable=False),
    sa.Column("standard_units", sa.Integer, nullable=False),
    sa.Column("micro_units", sa.Integer, nullable=False),
    sa.Column("tax", sa.BigInteger, nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("created_by", sa.String(255), nullable=False),
    sa.Index("ix_invoice_adjustments_invoice_id", "invoice_id"),
)

billing_runs = sa.Table(
    "billing_runs",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("period", sa.String(7), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("dry_run", sa.Boolean, nullable=False),
    sa.Column("catalog_version", sa.String(32), nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("summary", sa.JSON, nullable=False),
    sa.Index("ix_billing_runs_period", "period"),
)

# The estimate, alert and webhook tables hang off the same metadata: whoever loads the billing
# tables loads them too.
import billing.notices  # noqa: E402, F401
