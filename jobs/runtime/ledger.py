"""The run ledger: one row per attempt of a job for a key (job, logical time, shard).

``status`` moves ``running`` → ``succeeded | partial | failed``; a trigger for a key that already
succeeded is recorded as ``skipped``. A ``running`` row whose process died (the key's lock is
free again) is marked ``failed`` with ``error='abandoned: …'`` by the next trigger of its key,
or by a retry pass (``hostmeter run --retry-failed``, ``hostmeter retry-failed``, the local
scheduler), which then runs the key again.
"""

from __future__ import annotations

import sqlalchemy as sa

from metering.db import UTCDateTime, metadata

__all__ = ["RUN_STATUSES", "TRIGGERS", "job_runs"]

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
    sa.Column("deadline", UTCDateTime, nullable=True),
    sa.CheckConstraint(
        "status IN ('running', 'succeeded', 'partial', 'failed', 'skipped')", name="status"
    ),
    sa.CheckConstraint(
        "\"trigger\" IN ('schedule', 'manual', 'backfill', 'catch-up', 'retry')", name="trigger"
    ),
    sa.Index("ix_job_runs_key", "job", "logical_time", "shard"),
    sa.Index("ix_job_runs_started_at", "started_at"),
    sa.Index("ix_job_runs_status", "status"),
)
"""``deadline``: when a run is expected to have finished (its start plus the job's bound in the
registry); a run still ``running`` after it is reported (``hostmeter runs --overdue``) and
alerted on."""
