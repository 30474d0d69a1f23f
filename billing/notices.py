"""Tables of what tenants are told before and after the close: month-to-date estimates, budget
alerts, and the webhook outbox.

- ``usage_estimates``: one row per (period, tenant, as_of) written by ``estimate-usage``:
  the month-to-date invoice "if the month ended at ``as_of``" and the projection to the month's
  end (units and totals in the currency's minor unit). ``as_of`` is the exclusive end of the
  snapshotted hours counted (an hour boundary). Written again for the same ``as_of``, a row is
  replaced.
- ``budget_alerts``: per tenant, one threshold per measure (``amount`` in currency units,
  ``standard_units``, ``micro_units``), compared with the **projected** value.
- ``budget_alert_states``: per alert and period, whether the projection is over the threshold
  now, and how many times it crossed upward (part of each event's identity).
- ``outbox_events``: events written in the same transaction as the change that causes them
  (``usage.threshold``, ``usage.threshold_cleared``, ``invoice.drafted``, ``invoice.revised``,
  ``invoice.finalized``). ``id`` orders them; ``event_id`` is the public id (also the
  ``Idempotency-Key``); ``payload`` is the JSON body sent, fixed when the event is written.
- ``webhook_endpoints``: where events go: one tenant's (``tenant_id``) or every tenant's
  (``tenant_id`` NULL). ``secret`` signs the deliveries and is never shown.
- ``webhook_deliveries``: one row per (event, endpoint), fanned out when the event is written:
  ``pending`` → ``delivered`` or, after the retry window, ``dead``.
"""

from __future__ import annotations

import sqlalchemy as sa

from metering.db import UTCDateTime, metadata

__all__ = [
    "ALERT_MEASURES",
    "DELIVERY_STATUSES",
    "EVENT_TYPES",
    "budget_alert_states",
    "budget_alerts",
    "outbox_events",
    "usage_estimates",
    "webhook_deliveries",
    "webhook_endpoints",
]

ALERT_MEASURES = ("amount", "standard_units", "micro_units")
EVENT_TYPES = ("usage.threshold", "usage.threshold_cleared", "invoice.drafted",
               "invoice.revised", "invoice.finalized")
DELIVERY_STATUSES = ("pending", "delivered", "dead")

usage_estimates = sa.Table(
    "usage_estimates",
    metadata,
    sa.Column("period", sa.String(7), primary_key=True),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
    sa.Column("as_of", UTCDateTime, primary_key=True),
    sa.Column("hours_in_month", sa.Integer, nullable=False),
    sa.Column("hours_elapsed", sa.Integer, nullable=False),
    sa.Column("paid_hours", sa.Integer, nullable=False),
    sa.Column("catalog_version", sa.String(32), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("minor_units", sa.Integer, nullable=False),
    sa.Column("mtd_standard_units", sa.Integer, nullable=False),
    sa.Column("mtd_micro_units", sa.Integer, nullable=False),
    sa.Column("mtd_total", sa.BigInteger, nullable=False),
    sa.Column("projected_standard_units", sa.Integer, nullable=False),
    sa.Column("projected_micro_units", sa.Integer, nullable=False),
    sa.Column("projected_total", sa.BigInteger, nullable=False),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("computed_at", UTCDateTime, nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Index("ix_usage_estimates_as_of", "as_of"),
)

budget_alerts = sa.Table(
    "budget_alerts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("measure", sa.String(16), nullable=False),
    sa.Column("threshold", sa.Numeric(24, 6), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("updated_by", sa.String(255), nullable=False),
    sa.UniqueConstraint("tenant_id", "measure"),
    sa.CheckConstraint("measure IN ('amount', 'standard_units', 'micro_units')",
                       name="measure"),
)

budget_alert_states = sa.Table(
    "budget_alert_states",
    metadata,
    sa.Column("alert_id", sa.Integer, sa.ForeignKey("budget_alerts.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("period", sa.String(7), primary_key=True),
    sa.Column("crossed", sa.Boolean, nullable=False),
    sa.Column("crossings", sa.Integer, nullable=False),
    sa.Column("value", sa.Numeric(24, 6), nullable=False),
    sa.Column("as_of", UTCDateTime, nullable=False),
    sa.Column("changed_at", UTCDateTime, nullable=False),
)

outbox_events = sa.Table(
    "outbox_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(40), nullable=False, unique=True),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Index("ix_outbox_events_tenant_id", "tenant_id", "id"),
)

webhook_endpoints = sa.Table(
    "webhook_endpoints",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("secret", sa.Text, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("created_by", sa.String(255), nullable=False),
    sa.Column("disabled_at", UTCDateTime, nullable=True),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_pk", sa.Integer, sa.ForeignKey("outbox_events.id"), nullable=False),
    sa.Column("endpoint_id", sa.Integer, sa.ForeignKey("webhook_endpoints.id"), nullable=False),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("status", sa.String(12), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", UTCDateTime, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("last_attempt_at", UTCDateTime, nullable=True),
    sa.Column("delivered_at", UTCDateTime, nullable=True),
    sa.Column("last_status", sa.Integer, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.UniqueConstraint("event_pk", "endpoint_id"),
    sa.CheckConstraint("status IN ('pending', 'delivered', 'dead')", name="status"),
    sa.Index("ix_webhook_deliveries_queue", "status", "endpoint_id", "tenant_id", "event_pk"),
)
