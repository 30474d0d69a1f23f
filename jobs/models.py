"""The run ledger: one row per attempt of a job for a key (job, logical time, shard).

``status`` moves ``running`` → ``succeeded | partial | failed``; a trigger for a key that already
succeeded is recorded as ``skipped``. A ``running`` row whose process died (the key's lock is
free again) is marked ``failed`` with ``error='abandoned: …'`` by the next trigger, which then
retries.
"""

from __future__ import annotations

import sqlalchemy as sa

from metering.db import UTCDateTime, metadata

__all__ = [
    "RUN_STATUSES",
    "TRIGGERS",
    "export_checkpoints",
    "job_metrics",
    "job_runs",
    "log_checkpoints",
    "log_runs",
]

RUN_STATUSES = ("running", "succeeded", "partial", "failed", "skipped")
TRIGGERS = ("schedule", "manual", "backfill", "catch-up", "retry")

job_runs = sa.Table(
    "job_runs",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("job", sa.String(64), nullable=False),
    sa.Column("logical_time", UTCDateTime, nullable=False),
    sa.Column("scheduled_time", UTCDateTime, nullable=False),
    sa.Column("shard", sa.String(16), nullable=False),
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("counts", sa.JSON, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.CheckConstraint(
        "status IN ('running', 'succeeded', 'partial', 'failed', 'skipped')", name="status"
    ),
    sa.CheckConstraint(
        "\"trigger\" IN ('schedule', 'manual', 'backfill', 'catch-up', 'retry')", name="trigger"
    ),
    sa.Index("ix_job_runs_key", "job", "logical_time", "shard"),
    sa.Index("ix_job_runs_started_at", "started_at"),
)

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
)
"""Per exporter: the newest bucket delivered (advanced only after a successful send)."""
