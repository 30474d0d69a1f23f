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
from fractions import Fraction

__all__ = [
    "DashboardData", "GrowthRanking", "HourValue", "JobStatus", "MetricPoint", "MonthBilling",
    "MonthEstimates", "NoisyFlag", "NoisyFlags", "RunCompleteness", "RunFact", "TenantGrowth",
]


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
class HourValue:
    """One hourly value; ``hour`` is the start of the UTC hour (aware)."""

    hour: datetime
    value: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MonthEstimates:
    """The projected totals ``estimate-usage`` stored over one month ``[start, end)``: the
    fleet's sum at every ``as_of`` and the series of the largest tenants (by their latest
    projection, largest first), in currency units, oldest first."""

    period: str
    start: datetime
    end: datetime
    currency: str
    fleet: tuple[tuple[datetime, Decimal], ...]
    tenants: tuple[tuple[str, tuple[tuple[datetime, Decimal], ...]], ...] = ()
    chosen: bool = False
    """``tenants`` are the ones asked for (``hostmeter dashboard --tenant``), not the largest."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantGrowth:
    """A tenant's value in the latest hour beside its value in the same hour a day before."""

    tenant: str
    current: int
    previous: int | None
    """``None``: no value 24 hours before (a tenant new since then, or a gap in its series);
    its growth is then counted from 0."""

    @property
    def growth(self) -> int:
        return self.current - (self.previous or 0)

    @property
    def ratio(self) -> Fraction | None:
        """Growth relative to the value a day before (``None`` when there was none, or 0)."""
        return Fraction(self.growth, self.previous) if self.previous else None


@dataclass(frozen=True, slots=True, kw_only=True)
class GrowthRanking:
    """The tenants of one series (``hosts``, ``metrics``) that grew most from ``baseline``
    (``hour`` − 24 h) to ``hour`` (the series' latest hour), largest growth first."""

    series: str
    hour: datetime
    baseline: datetime
    tenants: tuple[TenantGrowth, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class NoisyFlag:
    """A flagged tenant-hour: ``value`` at least k × the tenant's trailing ``median``."""

    series: str
    tenant: str
    hour: datetime
    value: int
    median: Decimal

    @property
    def ratio(self) -> Decimal | None:
        return self.value / self.median if self.median else None


@dataclass(frozen=True, slots=True, kw_only=True)
class NoisyFlags:
    """The newest flagged tenant-hours from ``since`` on (``total`` of them in all)."""

    since: datetime
    total: int
    flags: tuple[NoisyFlag, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunCompleteness:
    """One run's tenant counts, as its ``job_finished`` event reported them."""

    job: str
    run_id: str
    status: str
    finished_at: datetime
    expected: int | None
    processed: int | None
    failed: int | None

    @property
    def missing(self) -> int:
        """Tenants expected but not processed (0 when the run did not report both)."""
        if self.expected is None or self.processed is None:
            return 0
        return max(self.expected - self.processed, 0)


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
    capacity: Mapping[str, tuple[HourValue, ...]] = field(default_factory=dict)
    """Fleet totals per hour (``hosts``, ``metrics``, ``posts`` → oldest first)."""
    growth: tuple[GrowthRanking, ...] = ()
    noisy: NoisyFlags | None = None
    completeness: tuple[RunCompleteness, ...] = ()
    """The latest runs of each job that reports tenant counts (by job, newest first)."""
    estimates: MonthEstimates | None = None
    """The current month's stored usage estimates (``None``: none stored yet)."""
