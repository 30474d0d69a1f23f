"""Prometheus text exposition of job and billing metrics.

The metrics are rebuilt from plain values (:class:`~jobs.monitoring.metricdata.JobStatus`,
:class:`~jobs.monitoring.metricdata.MonthBilling`) at every scrape: :func:`build_registry` wraps
them in a private registry with one custom collector, never the process-global default registry, so
a scrape shows exactly what the store holds now and nothing a previous scrape left behind.

Three ways out:

- :func:`exposition` — the text format (``text/plain; version=0.0.4``) as bytes;
- :func:`write_textfile` — a ``.prom`` file for node_exporter's textfile collector, written to a
  temporary file beside it and renamed into place, so a reader never sees half a file;
- :func:`serve` — ``GET /metrics`` on a small threaded HTTP server that calls ``build()`` per
  request.

Conventions the alert rules in ``infra/prometheus/alerts.yml`` rely on:

- ``hostmeter_job_runs_total`` has a series for every status in :data:`RUN_STATUSES` of every
  job it mentions, at 0 when there were none. ``increase()`` cannot see a counter's first
  sample, so a counter that appeared at 1 on the first failure would never alert.
- A job named in ``expected_jobs`` but never successful reports
  ``hostmeter_job_last_success_timestamp_seconds`` 0 (the epoch), so "no success for two
  intervals" fires for a job that never ran instead of staying silent for lack of a series.
- ``hostmeter_tenant_noisy{tenant, series}`` is 1 for each flagged series of a tenant shown
  (see below) and absent otherwise; the alert fires on ``== 1``.

Tenants, with bounded cardinality (:class:`TenantGauges`, read by
:func:`jobs.monitoring.exports.tenant_gauges` from ``tenant_series`` / ``tenant_flags``):

- **Which hour.** ``hosts`` and ``metrics`` describe the *snapshot hour*: the newest UTC hour
  before the current one that ``snapshot-usage`` has snapshotted. ``posts`` describes the newest
  hour before the current one with posts (the current hour is still filling up, so it would
  show a sawtooth). An hour older than :data:`~jobs.monitoring.exports.TENANT_FRESH` is not
  shown at all: a stopped pipeline shows no data rather than a day-old value, and a day-old
  flag does not keep an alert firing.
- **Fleet totals.** ``hostmeter_fleet_hosts``, ``hostmeter_fleet_metrics``,
  ``hostmeter_fleet_posts``: the sums over *every* tenant in that hour;
  ``hostmeter_tenants_noisy``: how many tenants are flagged in the snapshot hour ("currently"
  flagged means flagged in the snapshot hour; the next snapshot clears or keeps it).
- **Per tenant, top N only.** ``hostmeter_tenant_hosts|metrics|posts{tenant}`` exist for the
  N largest tenants of that series in its hour, plus the *shown* flagged tenants;
  ``hostmeter_tenant_noisy{tenant, series}`` for the shown flagged tenants: the N flagged
  tenants with the largest value / trailing median (all of them when N or fewer are flagged;
  ``hostmeter_tenants_noisy`` still counts every one). N is ``HOSTMETER_EXPORT_TOP_TENANTS``
  (default 10). So a scrape holds at most 2N series per tenant value family and 2N noisy
  series (N tenants × 2 flagged series), 8N per-tenant series in all, however many tenants
  the fleet has. Tenant keys are customer text: they only ever appear as label values, which
  prometheus-client escapes (backslash, double quote and line feed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client import write_to_textfile as _write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jobs.monitoring.metricdata import JobStatus, MonthBilling
from metering.db import describe_error

__all__ = [
    "METRIC_NAMES",
    "RUN_STATUSES",
    "HostmeterCollector",
    "MetricsServer",
    "TenantGauges",
    "build_registry",
    "exposition",
    "serve",
    "write_textfile",
]

RUN_STATUSES: tuple[str, ...] = ("succeeded", "partial", "failed", "skipped")
"""Every status a ``job_finished`` event can carry; each gets a runs series, 0 if none."""

METRIC_NAMES: frozenset[str] = frozenset(
    {
        "hostmeter_job_last_success_timestamp_seconds",
        "hostmeter_job_last_duration_seconds",
        "hostmeter_job_runs_total",
        "hostmeter_job_runs_overdue",
        "hostmeter_job_tenants_expected",
        "hostmeter_job_tenants_processed",
        "hostmeter_job_tenants_failed",
        "hostmeter_billing_invoices",
        "hostmeter_billing_units",
        "hostmeter_billing_amount",
        "hostmeter_snapshot_coverage_ratio",
        "hostmeter_log_malformed_lines_total",
        "hostmeter_fleet_hosts",
        "hostmeter_fleet_metrics",
        "hostmeter_fleet_posts",
        "hostmeter_tenants_noisy",
        "hostmeter_tenant_hosts",
        "hostmeter_tenant_metrics",
        "hostmeter_tenant_posts",
        "hostmeter_tenant_noisy",
    }
)
"""The sample names the exposition can contain (counters with their ``_total``)."""

log = structlog.get_logger("hostmeter.metrics")

TENANT_SERIES: tuple[str, ...] = ("hosts", "metrics", "posts")
"""The per-tenant series (``tenant_series.series``) with a fleet and a per-tenant family."""
_FLEET_HELP = {
    "hosts": "Active hosts (standard + micro) of all tenants in the latest snapshotted UTC hour.",
    "metrics": "Host metrics of all tenants in the latest snapshotted UTC hour.",
    "posts": "Metric posts ingested for all tenants in the latest complete UTC hour.",
}
_TENANT_HELP = {
    "hosts": "Active hosts (standard + micro) of the tenant in the latest snapshotted UTC hour",
    "metrics": "Host metrics of the tenant in the latest snapshotted UTC hour",
    "posts": "Metric posts ingested for the tenant in the latest complete UTC hour",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantGauges:
    """What the tenant families show at one scrape (see the module docstring)."""

    hours: Mapping[str, datetime] = field(default_factory=dict)
    """Series -> the UTC hour its gauges describe (a series without a recent hour is left out)."""
    fleet: Mapping[str, int] = field(default_factory=dict)
    """Series -> the total over every tenant in that hour."""
    noisy: int | None = None
    """Tenants flagged in the snapshot hour, all of them (``None``: no recent snapshot hour)."""
    tenants: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Series -> tenant -> value, for the tenants shown only (top N and shown flagged)."""
    flagged: tuple[tuple[str, str], ...] = ()
    """(tenant, series) flagged in the snapshot hour, for the shown flagged tenants only."""


def _timestamp(value: datetime) -> float:
    """Unix seconds; a naive datetime is taken as UTC (never as the host's local time)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


class HostmeterCollector(Collector):
    """Yields the hostmeter metric families for one snapshot of the store."""

    def __init__(
        self,
        jobs: Sequence[JobStatus],
        months: Sequence[MonthBilling],
        *,
        malformed_lines: int = 0,
        expected_jobs: Sequence[str] = (),
        overdue: Mapping[str, int] | None = None,
        tenants: TenantGauges | None = None,
    ) -> None:
        self._tenants = tenants
        self._jobs = {status.job: status for status in jobs}
        self._overdue = dict(overdue or {})
        self._job_names = sorted(set(self._jobs) | set(expected_jobs) | set(self._overdue))
        self._months = sorted(months, key=lambda m: (m.period, m.currency))
        self._malformed_lines = malformed_lines

    def collect(self) -> Iterable[Metric]:
        yield from self._job_families()
        yield from self._billing_families()
        malformed = CounterMetricFamily(
            "hostmeter_log_malformed_lines",
            "Job-log lines the aggregator could not parse, since the store began.",
        )
        malformed.add_metric([], self._malformed_lines)
        yield malformed
        if self._tenants is not None:
            yield from self._tenant_families(self._tenants)

    def _tenant_families(self, gauges: TenantGauges) -> Iterator[Metric]:
        for series in TENANT_SERIES:
            fleet = GaugeMetricFamily(f"hostmeter_fleet_{series}", _FLEET_HELP[series])
            if series in gauges.fleet:
                fleet.add_metric([], gauges.fleet[series])
            yield fleet
        noisy = GaugeMetricFamily(
            "hostmeter_tenants_noisy",
            "Tenants flagged as noisy neighbours in the latest snapshotted UTC hour.",
        )
        if gauges.noisy is not None:
            noisy.add_metric([], gauges.noisy)
        yield noisy
        for series in TENANT_SERIES:
            family = GaugeMetricFamily(
                f"hostmeter_tenant_{series}",
                f"{_TENANT_HELP[series]}; only the top tenants of the hour and the flagged "
                "ones (HOSTMETER_EXPORT_TOP_TENANTS).",
                labels=["tenant"],
            )
            for tenant, value in sorted(gauges.tenants.get(series, {}).items()):
                family.add_metric([tenant], value)
            yield family
        flagged = GaugeMetricFamily(
            "hostmeter_tenant_noisy",
            "1: the tenant's series (hosts, metrics) is at least k times its trailing median "
            "in the latest snapshotted UTC hour (the noisiest HOSTMETER_EXPORT_TOP_TENANTS "
            "tenants).",
            labels=["tenant", "series"],
        )
        for tenant, series in sorted(gauges.flagged):
            flagged.add_metric([tenant, series], 1)
        yield flagged

    def _job_families(self) -> Iterator[Metric]:
        last_success = GaugeMetricFamily(
            "hostmeter_job_last_success_timestamp_seconds",
            "Unix time the job's last successful run finished; 0 if it never succeeded.",
            labels=["job"],
            unit="seconds",
        )
        duration = GaugeMetricFamily(
            "hostmeter_job_last_duration_seconds",
            "Wall-clock duration of the job's latest run.",
            labels=["job"],
            unit="seconds",
        )
        runs = CounterMetricFamily(
            "hostmeter_job_runs",
            "Finished runs of the job by final status.",
            labels=["job", "status"],
        )
        overdue = GaugeMetricFamily(
            "hostmeter_job_runs_overdue",
            "Runs of the job still running past their deadline (start + the job's bound), "
            "from the run ledger.",
            labels=["job"],
        )
        tenants = {
            what: GaugeMetricFamily(
                f"hostmeter_job_tenants_{what}",
                f"Tenants the job's latest run {what}.",
                labels=["job"],
            )
            for what in ("expected", "processed", "failed")
        }
        for name in self._job_names:
            overdue.add_metric([name], self._overdue.get(name, 0))
            status = self._jobs.get(name)
            success = status.last_success if status else None
            last_success.add_metric([name], _timestamp(success) if success else 0.0)
            by_status = dict.fromkeys(RUN_STATUSES, 0)
            if status is None:
                runs_by_status: dict[str, int] = by_status
            else:
                runs_by_status = by_status | dict(status.runs_by_status)
            for run_status, count in sorted(runs_by_status.items()):
                runs.add_metric([name, run_status], count)
            if status is None:
                continue
            if status.last_duration_s is not None:
                duration.add_metric([name], status.last_duration_s)
            for what, value in (
                ("expected", status.tenants_expected),
                ("processed", status.tenants_processed),
                ("failed", status.tenants_failed),
            ):
                if value is not None:
                    tenants[what].add_metric([name], value)
        yield last_success
        yield duration
        yield runs
        yield overdue
        yield from tenants.values()

    def _billing_families(self) -> Iterator[Metric]:
        invoices = GaugeMetricFamily(
            "hostmeter_billing_invoices",
            "Invoices of the billing period (latest revisions, void excluded).",
            labels=["period", "currency"],
        )
        units = GaugeMetricFamily(
            "hostmeter_billing_units",
            "Billed host units of the billing period by unit kind.",
            labels=["period", "unit"],
        )
        amount = GaugeMetricFamily(
            "hostmeter_billing_amount",
            "Billed amount of the billing period, in the currency's major unit.",
            labels=["period", "currency"],
        )
        coverage = GaugeMetricFamily(
            "hostmeter_snapshot_coverage_ratio",
            "Hours of the billing period with a usage snapshot / hours in the period (0..1).",
            labels=["period"],
            unit="ratio",
        )
        units_by_period: dict[str, dict[str, int]] = {}
        coverage_by_period: dict[str, float] = {}
        for month in self._months:
            invoices.add_metric([month.period, month.currency], month.invoices)
            amount.add_metric([month.period, month.currency], float(month.amount))
            # Units and coverage are per period; a month billed in two currencies counts its
            # units once per currency row, so sum them and keep one coverage.
            per_unit = units_by_period.setdefault(month.period, {"standard": 0, "micro": 0})
            per_unit["standard"] += month.standard_units
            per_unit["micro"] += month.micro_units
            if month.hours_in_month > 0:
                coverage_by_period[month.period] = month.covered_hours / month.hours_in_month
        for period, per_unit in units_by_period.items():
            for unit, value in per_unit.items():
                units.add_metric([period, unit], value)
        for period, ratio in coverage_by_period.items():
            coverage.add_metric([period], ratio)
        yield invoices
        yield units
        yield amount
        yield coverage


def build_registry(
    jobs: Sequence[JobStatus],
    months: Sequence[MonthBilling],
    *,
    malformed_lines: int = 0,
    expected_jobs: Sequence[str] = (),
    overdue: Mapping[str, int] | None = None,
    tenants: TenantGauges | None = None,
) -> CollectorRegistry:
    """A fresh registry holding only the hostmeter collector for these values.

    ``expected_jobs`` (typically ``jobs.registry.JOBS``) get series even before their first
    run: runs at 0 for every status and a last-success time of 0. ``tenants`` adds the fleet
    and per-tenant families (left out when ``None``).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        HostmeterCollector(
            jobs, months, malformed_lines=malformed_lines, expected_jobs=expected_jobs,
            overdue=overdue, tenants=tenants,
        )
    )
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format (0.0.4) of everything in ``registry``.

    Every hostmeter name is a classic ``[a-zA-Z_:][a-zA-Z0-9_:]*`` name, so the output is the
    0.0.4 format and :func:`serve` labels it so (servers before Prometheus 3 know no other).
    """
    return generate_latest(registry)


def write_textfile(path: str, registry: CollectorRegistry) -> None:
    """Write the exposition to ``path`` atomically (temporary file beside it, then rename).

    node_exporter's textfile collector only reads files ending in ``.prom``.
    """
    _write_to_textfile(path, registry)


class MetricsServer:
    """A running ``/metrics`` server; stop it with :meth:`shutdown` or a ``with`` block."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (the one the OS chose when asked for port 0)."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def shutdown(self) -> None:
        """Stop serving, close the socket and wait for the serving thread."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def _handler(build: Callable[[], CollectorRegistry]) -> type[BaseHTTPRequestHandler]:
    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self._reply(HTTPStatus.NOT_FOUND, b"not found: try /metrics\n", "text/plain")
                return
            try:
                body = exposition(build())
            except Exception as exc:  # a failed scrape is a 500 and a log line, not a crash
                log.error("metrics_build_failed", error=describe_error(exc))
                self._reply(
                    HTTPStatus.INTERNAL_SERVER_ERROR, b"metrics unavailable\n", "text/plain"
                )
                return
            self._reply(HTTPStatus.OK, body, CONTENT_TYPE_PLAIN_0_0_4)

        def _reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes are routine; stay quiet instead of writing to stderr."""

    return MetricsHandler


def serve(
    port: int, build: Callable[[], CollectorRegistry], *, host: str = "127.0.0.1"
) -> MetricsServer:
    """Serve ``GET /metrics`` from a registry ``build()`` makes afresh for every scrape.

    Returns at once; the server runs in a daemon thread. ``port=0`` lets the OS choose (see
    :attr:`MetricsServer.port`).
    """
    httpd = ThreadingHTTPServer((host, port), _handler(build))
    httpd.daemon_threads = True
    thread = threading.Thread(
        target=httpd.serve_forever,
        name=f"hostmeter-metrics-{httpd.server_address[1]}",
        daemon=True,
    )
    thread.start()
    log.info("metrics_serving", host=host, port=int(httpd.server_address[1]))
    return MetricsServer(httpd, thread)
