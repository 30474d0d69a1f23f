"""Values that flow from the job-metrics store to the exporters and the dashboard.

The store (``jobs.monitoring.logmetrics``) turns structured job logs into these; the Mackerel and
Prometheus exporters and the dashboard only ever see these values, so each can be tested with
plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

__all__ = ["DashboardData", "JobStatus", "MetricPoint", "MonthBilling", "RunFact"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricPoint:
    """One time-bucketed value: ``name`` like ``hostmeter.job.runs``; ``time`` is the start
    (aware UTC) of a 5-minute bucket; ``labels`` like ``{"job": "snapshot-usage",
    "status": "succeeded"}`` (empty when the metric has none)."""

    name: str
    time: datetime
    value: Decimal
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFact:
    """One finished run, as its ``job_finished`` log event told it."""

    run_id: str
    job: str
    status: str
    finished_at: datetime
    logical_time: datetime | None
    duration_s: float
    counts: Mapping[str, object] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStatus:
    """The latest state of one job, for gauges and the dashboard."""

    job: str
    last_success: datetime | None
    last_duration_s: float | None
    last_status: str | None
    runs_by_status: Mapping[str, int]
    tenants_expected: int | None
    tenants_processed: int | None
    tenants_failed: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class MonthBilling:
    """A billing month's totals from the latest invoice revisions (not void)."""

    period: str
    currency: str
    invoices: int
    standard_units: int
    micro_units: int
    amount: Decimal
    covered_hours: int
    hours_in_month: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DashboardData:
    """Everything the dashboard page shows."""

    generated_at: datetime
    runs: tuple[RunFact, ...]
    jobs: tuple[JobStatus, ...]
    months: tuple[MonthBilling, ...]
    top_tenants: tuple[tuple[str, int, Decimal], ...]
    """(tenant, standard + micro units, amount) of the latest month, largest first."""
    malformed_lines: int = 0
