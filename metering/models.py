"""Usage tables: what ingest records and what ``snapshot-usage`` freezes.

Recorded usage (written by ingest, idempotently):

- ``tenants``, ``hosts``: surrogate integer ids for the external keys.
- ``metric_names``: per tenant and namespace (``host``/``service``), each distinct metric name
  gets a dense ordinal. It is the dictionary for the bitmaps below. A service metric is named
  by its service and its name together (``metering.ingest.service_metric_key``).
- ``host_hours``: one row per (host, UTC hour) with the bitmap of the metric ordinals the host
  posted in that hour and its population count (``metric_count``). Merging a later post is a
  bitwise OR, so counts stay exact, re-loading a post changes nothing, and there is no row per
  post or per (host, hour, metric).
- ``service_hours``: the same per (tenant, hour) over all the tenant's services.

On PostgreSQL ``host_hours``, ``service_hours`` and ``usage_snapshots`` are partitioned by UTC
month, with a DEFAULT partition (migration 0010, :mod:`metering.partitions`); SQLite keeps
plain tables.
- ``plan_changes``, ``monitor_events``, ``role_events``, ``role_member_events``: state changes,
  keyed by their whole content so that loading them twice is a no-op.

Frozen usage (written by ``snapshot-usage``):

- ``usage_snapshots``: one row per tenant-hour (BILLING_RULES.md §1).
- ``usage_snapshot_roles``: per tenant-hour, per enabled anomaly-detection role, the active
  standard member hosts.
- ``snapshot_hours``: which hours have been snapshotted (a gap is a missing row here; a tenant
  with zero usage is a missing row in ``usage_snapshots`` for a covered hour).
"""

from __future__ import annotations

import sqlalchemy as sa

from metering.db import UTCDateTime, metadata

__all__ = [
    "HOST_KINDS",
    "PLANS",
    "host_hours",
    "hosts",
    "metric_names",
    "monitor_events",
    "plan_changes",
    "role_events",
    "role_member_events",
    "service_hours",
    "snapshot_hours",
    "tenants",
    "usage_retention",
    "usage_snapshot_roles",
    "usage_snapshots",
]

PLANS = ("free", "trial", "standard")
HOST_KINDS = ("standard", "micro")

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(200), nullable=False, unique=True),
)

hosts = sa.Table(
    "hosts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("key", sa.String(255), nullable=False),
    sa.UniqueConstraint("tenant_id", "key"),
)

metric_names = sa.Table(
    "metric_names",
    metadata,
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
    sa.Column("namespace", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(800), primary_key=True),
    sa.Column("ordinal", sa.Integer, nullable=False),
    sa.UniqueConstraint("tenant_id", "namespace", "ordinal"),
    sa.CheckConstraint("namespace IN ('host', 'service')", name="namespace"),
)

host_hours = sa.Table(
    "host_hours",
    metadata,
    sa.Column("host_id", sa.Integer, sa.ForeignKey("hosts.id"), primary_key=True),
    sa.Column("hour", UTCDateTime, primary_key=True),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("metric_count", sa.Integer, nullable=False),
    sa.Column("metric_bits", sa.LargeBinary, nullable=False),
    sa.CheckConstraint("kind IN ('standard', 'micro')", name="kind"),
    sa.Index("ix_host_hours_hour_tenant", "hour", "tenant_id"),
    postgresql_partition_by="RANGE (hour)",  # by UTC month: metering.partitions
)

service_hours = sa.Table(
    "service_hours",
    metadata,
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
    sa.Column("hour", UTCDateTime, primary_key=True),
    sa.Column("metric_count", sa.Integer, nullable=False),
    sa.Column("metric_bits", sa.LargeBinary, nullable=False),
    sa.Index("ix_service_hours_hour", "hour"),
    postgresql_partition_by="RANGE (hour)",
)

plan_changes = sa.Table(
    "plan_changes",
    metadata,
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
    sa.Column("at", UTCDateTime, primary_key=True),
    sa.Column("plan", sa.String(16), nullable=False),
    sa.CheckConstraint("plan IN ('free', 'trial', 'standard')", name="plan"),
)

monitor_events = sa.Table(
    "monitor_events",
    metadata,
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
    sa.Column("monitor", sa.String(255), primary_key=True),
    sa.Column("at", UTCDateTime, primary_key=True),
    sa.Column("present", sa.Boolean, primary_key=True),
)

role_events = sa.Table(
    "role_events",
    metadata,
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
    sa.Column("role", sa.String(255), primary_key=True),
    sa.Column("at", UTCDateTime, primary_key=True),
    sa.Column("enabled", sa.Boolean, primary_key=True),
)

role_member_events = sa.Table(
    "role_member_events",
    metadata,
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
    sa.Column("role", sa.String(255), primary_key=True),
    sa.Column("host_id", sa.Integer, sa.ForeignKey("hosts.id"), primary_key=True),
    sa.Column("at", UTCDateTime, primary_key=True),
    sa.Column("member", sa.Boolean, primary_key=True),
)

usage_snapshots = sa.Table(
    "usage_snapshots",
    metadata,
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
    sa.Column("hour", UTCDateTime, primary_key=True),
    sa.Column("plan", sa.String(16), nullable=True),
    sa.Column("standard_hosts", sa.Integer, nullable=False),
    sa.Column("micro_hosts", sa.Integer, nullable=False),
    sa.Column("standard_overage", sa.Integer, nullable=False),
    sa.Column("micro_overage", sa.Integer, nullable=False),
    sa.Column("host_metrics", sa.Integer, nullable=False),
    sa.Column("service_metrics", sa.Integer, nullable=False),
    sa.Column("monitors", sa.Integer, nullable=False),
    sa.Column("standard_metric_limit", sa.Integer, nullable=False),
    sa.Column("micro_metric_limit", sa.Integer, nullable=False),
    sa.Index("ix_usage_snapshots_hour", "hour"),
    postgresql_partition_by="RANGE (hour)",
)

usage_snapshot_roles = sa.Table(
    "usage_snapshot_roles",
    metadata,
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
    sa.Column("hour", UTCDateTime, primary_key=True),
    sa.Column("role", sa.String(255), primary_key=True),
    sa.Column("hosts", sa.Integer, nullable=False),
    sa.Index("ix_usage_snapshot_roles_hour", "hour"),
)

usage_retention = sa.Table(
    "usage_retention",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("pruned_before", UTCDateTime, nullable=False),
    sa.Column("pruned_at", UTCDateTime, nullable=False),
)
"""The watermark of ``prune-usage`` (one row, ``name='raw_usage'``): recorded hours before
``pruned_before`` may be gone, so their snapshots are final and are never recomputed."""

snapshot_hours = sa.Table(
    "snapshot_hours",
    metadata,
    sa.Column("hour", UTCDateTime, primary_key=True),
    sa.Column("snapshotted_at", UTCDateTime, nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("tenants", sa.Integer, nullable=False),
)
