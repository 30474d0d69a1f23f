"""The job registry: the one place that knows each job's name, schedule and window.

The local scheduler, the AWS entry points, ``hostmeter run`` and the infrastructure templates
read (or are tested against) this table.

Each job's body is named by its import path (``"jobs.snapshot_usage:run"``) and imported on first
use (:attr:`JobSpec.run`): reading the schedule costs nothing, and a process that runs one job
(an ECS task, a Lambda invocation) imports that job's code and what it needs, not every job's.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from jobs.runtime.errors import UnknownJob
from metering.display import quote_name
from metering.timeutil import floor_hour, month_bounds, previous_period

__all__ = ["JOBS", "JobSpec", "get"]


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """One scheduled job."""

    name: str
    schedule: str
    """EventBridge Scheduler expression, e.g. ``cron(5 * * * ? *)``."""
    timezone: str
    description: str
    body: str | Callable[..., dict[str, Any]]
    """The job body ``run(ctx, logical_time, **options) -> counts``: its ``"module:function"``
    import path (the registry's own jobs), or the function itself."""
    key_time: Callable[[datetime, ZoneInfo, Mapping[str, Any]], datetime]
    """Scheduled time (and options) → the normalized start of the window: the ledger key."""
    options: frozenset[str] = frozenset()
    """The ``hostmeter run`` options this job takes (beyond ``--at``)."""
    shardable: bool = False
    max_runtime: timedelta = timedelta(hours=1)
    """How long a run may take before it counts as overdue (its ledger ``deadline``): far above
    a normal run, well below the time an operator would want to hear about a stuck one."""
    catch_up: bool = True
    """Whether a lost trigger must be run later (its window is covered by no other run). False
    for jobs whose every run covers everything since the last one (log aggregation, pruning)."""

    @property
    def run(self) -> Callable[..., dict[str, Any]]:
        """The job body, imported on first use."""
        if callable(self.body):
            return self.body
        module, _, name = self.body.partition(":")
        body: Callable[..., dict[str, Any]] = getattr(importlib.import_module(module), name)
        return body


def _hour_key(at: datetime, zone: ZoneInfo, options: Mapping[str, Any]) -> datetime:
    """Hourly jobs: the hour the trigger belongs to (10:05 and 10:07 are one key)."""
    return floor_hour(at)


def _month_key(at: datetime, zone: ZoneInfo, options: Mapping[str, Any]) -> datetime:
    """Monthly jobs: the start of the billed month (``--period``, or the month before)."""
    period = options.get("period") or previous_period(at, zone)
    return month_bounds(period, zone)[0]


def _five_minute_key(at: datetime, zone: ZoneInfo, options: Mapping[str, Any]) -> datetime:
    """Every-5-minutes jobs: the 5-minute slot the trigger belongs to."""
    hour = floor_hour(at)
    return hour.replace(minute=at.astimezone(hour.tzinfo).minute // 5 * 5)


def _minute_key(at: datetime, zone: ZoneInfo, options: Mapping[str, Any]) -> datetime:
    """Every-minute jobs: the minute the trigger belongs to."""
    return at.astimezone(floor_hour(at).tzinfo).replace(second=0, microsecond=0)


def _day_key(at: datetime, zone: ZoneInfo, options: Mapping[str, Any]) -> datetime:
    """Daily jobs: the UTC day the trigger belongs to."""
    return floor_hour(at).replace(hour=0)


JOBS: dict[str, JobSpec] = {
    spec.name: spec
    for spec in (
        JobSpec(
            name="snapshot-usage",
            schedule="cron(5 * * * ? *)",
            timezone="UTC",
            description="snapshot the previous full hour (+ look-back) into usage_snapshots",
            body="jobs.snapshot_usage:run",
            key_time=_hour_key,
            options=frozenset({"lookback"}),
            max_runtime=timedelta(minutes=30),
        ),
        JobSpec(
            name="close-billing-period",
            schedule="cron(0 3 1 * ? *)",
            timezone="Asia/Tokyo",
            description="close the previous month: draft invoices for every paying tenant",
            body="jobs.billing_jobs:close",
            key_time=_month_key,
            options=frozenset({"period", "tenants", "dry_run"}),
            shardable=True,
            max_runtime=timedelta(hours=2),
        ),
        JobSpec(
            name="finalize-invoices",
            schedule="cron(0 3 4 * ? *)",
            timezone="Asia/Tokyo",
            description="make the previous month's draft invoices final",
            body="jobs.billing_jobs:finalize",
            key_time=_month_key,
            options=frozenset({"period", "tenants", "dry_run"}),
            max_runtime=timedelta(minutes=30),
        ),
        JobSpec(
            name="aggregate-job-logs",
            schedule="rate(5 minutes)",
            timezone="UTC",
            description="read new job-log lines into job metrics; export to Mackerel/Prometheus",
            body="jobs.aggregate_job_logs:run",
            key_time=_five_minute_key,
            max_runtime=timedelta(minutes=5),
            catch_up=False,
        ),
        JobSpec(
            name="flush-usage",
            schedule="rate(5 minutes)",
            timezone="UTC",
            description="move the hours held in Redis (the post-time hot path) into the database",
            body="jobs.flush_usage:run",
            key_time=_five_minute_key,
            max_runtime=timedelta(minutes=5),
            catch_up=False,
        ),
        JobSpec(
            name="estimate-usage",
            schedule="cron(15 * * * ? *)",
            timezone="UTC",
            description="month-to-date estimates and projections per tenant; budget alerts",
            body="jobs.estimate_usage:run",
            key_time=_hour_key,
            max_runtime=timedelta(minutes=30),
            catch_up=False,
        ),
        JobSpec(
            name="deliver-webhooks",
            schedule="rate(1 minute)",
            timezone="UTC",
            description="send the outbox's events to their webhook endpoints (signed, retried)",
            body="jobs.deliver_webhooks:run",
            key_time=_minute_key,
            max_runtime=timedelta(minutes=5),
            catch_up=False,
        ),
        JobSpec(
            name="prune-usage",
            schedule="cron(30 4 * * ? *)",
            timezone="UTC",
            description="delete recorded usage past retention (snapshotted whole months only)",
            body="jobs.prune_usage:run",
            key_time=_day_key,
            max_runtime=timedelta(hours=1),
            catch_up=False,
        ),
    )
}


def get(name: str) -> JobSpec:
    try:
        return JOBS[name]
    except KeyError:
        raise UnknownJob(
            f"unknown job {quote_name(name)} (known jobs: {', '.join(sorted(JOBS))})", job=name
        ) from None
