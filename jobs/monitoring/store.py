"""The job-metrics store: how far the job logs have been read, the runs read from them, the
metrics derived from those runs, and what each exporter has delivered of them.

Written by :mod:`jobs.monitoring.logmetrics` (and the exporters' checkpoints by
:mod:`jobs.monitoring.exports`); read by the exporters and the dashboard.
"""

from __future__ import annotations

import sqlalchemy as sa

from metering.db import UTCDateTime, metadata

__all__ = [
    "export_checkpoints",
    "export_deliveries",
    "job_metrics",
    "log_checkpoints",
    "log_runs",
    "tenant_flags",
    "tenant_series",
]

log_checkpoints = sa.Table(
    "log_checkpoints",
    metadata,
    sa.Column("path", sa.String(1000), primary_key=True),
    sa.Column("device", sa.BigInteger, nullable=False),
    sa.Column("inode", sa.BigInteger, nullable=False),
    sa.Column("head", sa.String(64), nullable=False),
    sa.Column("offset", sa.BigInteger, nullable=False),
    sa.Column("malformed", sa.BigInteger, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)
"""How far each job-log file has been read. A file is the same file while its device, inode
and first line (``head``, a hash) are; otherwise (rotation, replacement) or when it shrank
(truncation) it is read again from the start."""

log_runs = sa.Table(
    "log_runs",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("job", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=False),
    sa.Column("logical_time", UTCDateTime, nullable=True),
    sa.Column("duration_s", sa.Float, nullable=False),
    sa.Column("counts", sa.JSON, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Index("ix_log_runs_finished_at", "finished_at"),
)
"""One row per ``job_finished`` event read from the logs (the run id makes re-reading a no-op).
``duration_s`` is a measured duration, never money."""

job_metrics = sa.Table(
    "job_metrics",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("bucket", UTCDateTime, primary_key=True),
    sa.Column("job", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(16), primary_key=True),
    sa.Column("value", sa.Numeric(24, 6), nullable=False),
    sa.Index("ix_job_metrics_bucket", "bucket"),
)
"""Time-bucketed (5-minute) metrics derived from ``log_runs``; ``job``/``status`` are '' when a
metric has no such label."""

export_checkpoints = sa.Table(
    "export_checkpoints",
    metadata,
    sa.Column("exporter", sa.String(32), primary_key=True),
    sa.Column("sent_until", UTCDateTime, nullable=True),
    sa.Column("graphs_posted", sa.Boolean, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("retry_at", UTCDateTime, nullable=True),
)
"""Per exporter: the newest bucket delivered (informative: what is sent is decided per point by
``export_deliveries``), whether the graph definitions were posted, and ``retry_at``, the instant
the endpoint asked (``Retry-After``) not to be called before."""

export_deliveries = sa.Table(
    "export_deliveries",
    metadata,
    sa.Column("exporter", sa.String(32), primary_key=True),
    sa.Column("bucket", UTCDateTime, primary_key=True),
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("job", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(16), primary_key=True),
    sa.Column("value", sa.Numeric(24, 6), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("doubt_until", UTCDateTime, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)
"""Per exporter and ``job_metrics`` point: the value the exporter is done with. ``outcome`` is
``delivered`` (the endpoint accepted ``value``), ``too_old`` (``value`` is past what the endpoint
accepts, so it was not sent) or ``in_doubt`` (a request carrying the point was cut off before
any value was ever accepted; ``value`` is NULL). ``doubt_until`` (NULL when none) is set when a
request carrying the point was cut off after it was sent: it may still land until then,
possibly over a newer value, so the point is sent once more after it. A point whose stored value
differs from ``value``, or whose ``doubt_until`` has passed, is sent by the next pass."""

tenant_series = sa.Table(
    "tenant_series",
    metadata,
    sa.Column("series", sa.String(16), primary_key=True),
    sa.Column("hour", UTCDateTime, primary_key=True),
    sa.Column("tenant", sa.String(200), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
    sa.Column("seen_at", UTCDateTime, nullable=False),
    sa.Index("ix_tenant_series_tenant", "series", "tenant", "hour"),
)
"""Per-tenant hourly series read from the jobs' per-item events (:mod:`jobs.monitoring.tenants`):
``hosts`` and ``metrics`` of each snapshotted tenant-hour (the latest snapshot of the hour wins:
``seen_at`` is its log line's timestamp), ``posts`` ingested in the hour (summed over the ingests
whose ``tenant_ingested`` line falls in it)."""

tenant_flags = sa.Table(
    "tenant_flags",
    metadata,
    sa.Column("series", sa.String(16), primary_key=True),
    sa.Column("hour", UTCDateTime, primary_key=True),
    sa.Column("tenant", sa.String(200), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
    sa.Column("median", sa.Numeric(24, 6), nullable=False),
    sa.Index("ix_tenant_flags_hour", "hour"),
)
"""Noisy neighbours: a tenant-hour whose ``series`` value jumped to at least k times the tenant's
trailing median (``median``) over the window before it."""
