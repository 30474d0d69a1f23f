"""Prometheus exposition (jobs/prometheus.py) and the monitoring files in infra/ built on it.

promtool tests skip when promtool is not on PATH; CI installs it (Debian package ``prometheus``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobs.monitoring import mackerel
from jobs.monitoring.metricdata import JobStatus, MonthBilling
from jobs.monitoring.prometheus import (
    METRIC_NAMES,
    RUN_STATUSES,
    TenantGauges,
    build_registry,
    exposition,
    serve,
    write_textfile,
)
from jobs.registry import JOBS

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not on PATH (CI installs it: apt-get install -y prometheus)",
)

SNAPSHOT = JobStatus(
    job="snapshot-usage",
    last_success=datetime(2024, 6, 1, 10, 5, 30, tzinfo=UTC),  # 1717236330
    last_duration_s=12.5,
    last_status="failed",
    runs_by_status={"succeeded": 30, "failed": 2},
    tenants_expected=None,
    tenants_processed=None,
    tenants_failed=None,
)
CLOSE = JobStatus(
    job="close-billing-period",
    last_success=None,
    last_duration_s=3.25,
    last_status="partial",
    runs_by_status={"partial": 1},
    tenants_expected=40,
    tenants_processed=38,
    tenants_failed=2,
)
MAY = MonthBilling(
    period="2024-05",
    currency="JPY",
    invoices=38,
    standard_units=120,
    micro_units=7,
    amount=Decimal("1234567.5"),
    covered_hours=372,
    hours_in_month=744,
)

HOUR = datetime(2024, 6, 1, 9, tzinfo=UTC)
HOSTILE = 'acme"} 1\nhostmeter_fleet_hosts 9e9 # \\'
TENANTS = TenantGauges(
    hours={"hosts": HOUR, "metrics": HOUR, "posts": HOUR},
    fleet={"hosts": 1_200, "metrics": 90_000, "posts": 45_000},
    noisy=3,
    tenants={"hosts": {HOSTILE: 700, "globex": 40}, "metrics": {HOSTILE: 60_000, "globex": 900},
             "posts": {HOSTILE: 30_000}},
    flagged=(("globex", "hosts"), ("globex", "metrics")),
)


def _text(
    *,
    jobs: Sequence[JobStatus] = (SNAPSHOT, CLOSE),
    months: Sequence[MonthBilling] = (MAY,),
    malformed_lines: int = 0,
    expected_jobs: Sequence[str] = (),
    tenants: TenantGauges | None = None,
) -> str:
    registry = build_registry(
        jobs, months, malformed_lines=malformed_lines, expected_jobs=expected_jobs,
        tenants=tenants,
    )
    return exposition(registry).decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, parsed by prometheus_client's own parser."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


# --- exposition -------------------------------------------------------------------------------


def test_exposition_has_exact_lines_for_jobs_billing_and_logs() -> None:
    lines = set(_text(malformed_lines=3).splitlines())
    assert {
        'hostmeter_job_last_success_timestamp_seconds{job="snapshot-usage"} 1.71723633e+09',
        'hostmeter_job_last_duration_seconds{job="snapshot-usage"} 12.5',
        'hostmeter_job_runs_total{job="snapshot-usage",status="failed"} 2.0',
        'hostmeter_job_runs_total{job="close-billing-period",status="partial"} 1.0',
        'hostmeter_job_tenants_expected{job="close-billing-period"} 40.0',
        'hostmeter_job_tenants_processed{job="close-billing-period"} 38.0',
        'hostmeter_job_tenants_failed{job="close-billing-period"} 2.0',
        'hostmeter_billing_units{period="2024-05",unit="standard"} 120.0',
        'hostmeter_billing_units{period="2024-05",unit="micro"} 7.0',
        'hostmeter_billing_amount{currency="JPY",period="2024-05"} 1.2345675e+06',
        'hostmeter_billing_invoices{currency="JPY",period="2024-05"} 38.0',
        'hostmeter_snapshot_coverage_ratio{period="2024-05"} 0.5',
        "hostmeter_log_malformed_lines_total 3.0",
        "# TYPE hostmeter_job_runs_total counter",
        "# TYPE hostmeter_log_malformed_lines_total counter",
        "# TYPE hostmeter_job_last_success_timestamp_seconds gauge",
    } <= lines


def test_parsed_values_are_the_inputs() -> None:
    samples = _samples(_text())
    job = (("job", "snapshot-usage"),)
    assert samples[("hostmeter_job_last_success_timestamp_seconds", job)] == 1717236330.0
    assert samples[("hostmeter_job_last_duration_seconds", job)] == 12.5
    assert samples[("hostmeter_billing_amount", (("currency", "JPY"), ("period", "2024-05")))] == (
        1234567.5
    )


def test_every_family_has_help_type_and_a_known_name() -> None:
    families = list(text_string_to_metric_families(_text(expected_jobs=list(JOBS),
                                                         tenants=TENANTS)))
    for family in families:
        assert family.name.startswith("hostmeter_")
        assert family.documentation.strip(), family.name
        assert family.type in ("gauge", "counter"), family.name
    names = {s.name for f in families for s in f.samples}
    assert names == METRIC_NAMES  # every exported name is declared and every declared one shown


def test_counters_start_at_zero_for_every_status_so_increase_sees_the_first_failure() -> None:
    samples = _samples(_text())
    for status in RUN_STATUSES:
        key = ("hostmeter_job_runs_total", (("job", "close-billing-period"), ("status", status)))
        assert samples[key] == (1.0 if status == "partial" else 0.0)


def test_expected_job_that_never_ran_exports_zero_last_success_and_zero_runs() -> None:
    samples = _samples(_text(jobs=[SNAPSHOT], expected_jobs=["prune-usage", "snapshot-usage"]))
    prune = (("job", "prune-usage"),)
    assert samples[("hostmeter_job_last_success_timestamp_seconds", prune)] == 0.0
    assert all(
        samples[("hostmeter_job_runs_total", (("job", "prune-usage"), ("status", s)))] == 0.0
        for s in RUN_STATUSES
    )
    # no run, no duration: an invented 0 would read as a zero-second run.
    assert ("hostmeter_job_last_duration_seconds", prune) not in samples


def test_job_that_never_succeeded_exports_zero_last_success() -> None:
    samples = _samples(_text())
    key = ("hostmeter_job_last_success_timestamp_seconds", (("job", "close-billing-period"),))
    assert samples[key] == 0.0


def test_unknown_tenant_counts_are_left_out_not_zero() -> None:
    samples = _samples(_text())
    job = (("job", "snapshot-usage"),)
    for what in ("expected", "processed", "failed"):
        assert (f"hostmeter_job_tenants_{what}", job) not in samples


def test_naive_last_success_is_read_as_utc_not_local_time() -> None:
    # A fresh interpreter started with TZ set: not every Python has os.tzset().
    script = (
        "from datetime import datetime\n"
        "from jobs.monitoring.metricdata import JobStatus\n"
        "from jobs.monitoring.prometheus import build_registry\n"
        "status = JobStatus(job='prune-usage', last_success=datetime(2024, 6, 1, 4, 30),\n"
        "    last_duration_s=1.0, last_status='succeeded', runs_by_status={},\n"
        "    tenants_expected=None, tenants_processed=None, tenants_failed=None)\n"
        "print(build_registry([status], []).get_sample_value(\n"
        "    'hostmeter_job_last_success_timestamp_seconds', {'job': 'prune-usage'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "TZ": "Asia/Tokyo"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert float(result.stdout) == datetime(2024, 6, 1, 4, 30, tzinfo=UTC).timestamp()


def test_units_of_a_period_billed_in_two_currencies_are_summed_once_per_unit() -> None:
    usd = MonthBilling(
        period="2024-05", currency="USD", invoices=2, standard_units=5, micro_units=1,
        amount=Decimal("99.95"), covered_hours=372, hours_in_month=744,
    )  # fmt: skip
    samples = _samples(_text(months=[MAY, usd]))
    assert samples[("hostmeter_billing_units", (("period", "2024-05"), ("unit", "standard")))] == (
        125.0
    )
    assert samples[("hostmeter_billing_units", (("period", "2024-05"), ("unit", "micro")))] == 8.0
    assert samples[("hostmeter_billing_amount", (("currency", "USD"), ("period", "2024-05")))] == (
        99.95
    )


def test_a_period_without_hours_has_no_coverage_instead_of_dividing_by_zero() -> None:
    empty = MonthBilling(
        period="2024-07", currency="JPY", invoices=0, standard_units=0, micro_units=0,
        amount=Decimal(0), covered_hours=0, hours_in_month=0,
    )  # fmt: skip
    samples = _samples(_text(months=[empty]))
    assert ("hostmeter_snapshot_coverage_ratio", (("period", "2024-07"),)) not in samples


def test_tenant_families_hold_exactly_the_given_tenants_with_escaped_keys() -> None:
    samples = _samples(_text(tenants=TENANTS))
    tenant = {(name, labels): v for (name, labels), v in samples.items()
              if name.startswith(("hostmeter_fleet_", "hostmeter_tenant"))}
    assert tenant == {
        ("hostmeter_fleet_hosts", ()): 1_200, ("hostmeter_fleet_metrics", ()): 90_000,
        ("hostmeter_fleet_posts", ()): 45_000, ("hostmeter_tenants_noisy", ()): 3,
        ("hostmeter_tenant_hosts", (("tenant", HOSTILE),)): 700,
        ("hostmeter_tenant_hosts", (("tenant", "globex"),)): 40,
        ("hostmeter_tenant_metrics", (("tenant", HOSTILE),)): 60_000,
        ("hostmeter_tenant_metrics", (("tenant", "globex"),)): 900,
        ("hostmeter_tenant_posts", (("tenant", HOSTILE),)): 30_000,
        ("hostmeter_tenant_noisy", (("series", "hosts"), ("tenant", "globex"))): 1,
        ("hostmeter_tenant_noisy", (("series", "metrics"), ("tenant", "globex"))): 1,
    }
    text = _text(tenants=TENANTS)
    assert 'hostmeter_tenant_hosts{tenant="acme\\"} 1\\nhostmeter_fleet_hosts 9e9 # \\\\"} 700.0' \
        in text.splitlines()


def test_without_a_recent_hour_the_fleet_and_noisy_gauges_are_absent_not_zero() -> None:
    samples = _samples(_text(tenants=TenantGauges()))
    assert not [name for name, _ in samples if name.startswith(("hostmeter_fleet_",
                                                                "hostmeter_tenant"))]
    # and without tenant values at all (a registry built for jobs only) no family is there
    assert "hostmeter_fleet_hosts" not in _text()


def test_registries_are_independent_and_the_global_registry_is_untouched() -> None:
    first = build_registry([SNAPSHOT], [MAY])
    second = build_registry([CLOSE], [])
    assert "close-billing-period" not in exposition(first).decode()
    assert "snapshot-usage" not in exposition(second).decode()
    assert "hostmeter_" not in prometheus_client.generate_latest().decode()


# --- textfile ---------------------------------------------------------------------------------


def test_textfile_replaces_the_file_by_rename_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "hostmeter.prom"
    path.write_text("# stale\n")
    before = path.stat().st_ino
    write_textfile(str(path), build_registry([SNAPSHOT], [MAY]))
    assert path.stat().st_ino != before  # a new file renamed over the old, not rewritten in place
    assert [p.name for p in tmp_path.iterdir()] == ["hostmeter.prom"]
    text = path.read_text()
    assert text == exposition(build_registry([SNAPSHOT], [MAY])).decode()
    assert ("hostmeter_snapshot_coverage_ratio", (("period", "2024-05"),)) in _samples(text)


# --- HTTP -------------------------------------------------------------------------------------


def test_serve_builds_a_fresh_registry_per_scrape_over_real_http() -> None:
    scrapes: list[int] = []

    def build() -> prometheus_client.CollectorRegistry:
        scrapes.append(1)
        return build_registry([SNAPSHOT], [MAY], malformed_lines=len(scrapes))

    with serve(0, build) as server:
        assert server.port != 0
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            first = response.read().decode()
        with urllib.request.urlopen(url, timeout=5) as response:
            second = response.read().decode()
    assert "hostmeter_log_malformed_lines_total 1.0" in first.splitlines()
    assert "hostmeter_log_malformed_lines_total 2.0" in second.splitlines()
    assert second == exposition(build_registry([SNAPSHOT], [MAY], malformed_lines=2)).decode()


def test_serve_answers_404_elsewhere_and_500_when_build_fails() -> None:
    def broken() -> prometheus_client.CollectorRegistry:
        raise RuntimeError("store unavailable")

    with serve(0, broken) as server:
        base = f"http://127.0.0.1:{server.port}"
        with pytest.raises(urllib.error.HTTPError) as not_found:
            urllib.request.urlopen(base + "/", timeout=5)
        assert not_found.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(base + "/metrics", timeout=5)
        assert failed.value.code == 500
        assert b"store unavailable" not in failed.value.read()


def test_shutdown_releases_the_port() -> None:
    server = serve(0, lambda: build_registry([], []))
    url = f"http://127.0.0.1:{server.port}/metrics"
    server.shutdown()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


# --- promtool ---------------------------------------------------------------------------------


def _promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, timeout=60, cwd=ROOT, check=False
    )


@needs_promtool
def test_promtool_check_metrics_accepts_the_exposition() -> None:
    text = exposition(
        build_registry([SNAPSHOT, CLOSE], [MAY], malformed_lines=1, expected_jobs=list(JOBS),
                       tenants=TENANTS)
    )
    result = _promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


@needs_promtool
def test_promtool_check_rules_accepts_the_alert_rules() -> None:
    result = _promtool("check", "rules", "infra/prometheus/alerts.yml")
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", "infra/prometheus/alerts_test.yml")
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_every_alert_has_a_unit_test_and_severity() -> None:
    rules = (INFRA / "prometheus" / "alerts.yml").read_text()
    tests = (INFRA / "prometheus" / "alerts_test.yml").read_text()
    alerts = re.findall(r"^\s*- alert: (\w+)$", rules, re.MULTILINE)
    assert alerts and len(re.findall(r"^\s+severity: (?:critical|warning)$", rules, re.M)) == len(
        alerts
    )
    tested = set(re.findall(r"alertname: (\w+)", tests))
    assert set(alerts) == tested


# --- dashboards and rules cannot drift from what is exported -----------------------------------

_PROM_NAME = re.compile(r"\bhostmeter_[a-z0-9_]+")


def _strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def test_alert_rules_reference_only_exported_metrics() -> None:
    used = set(_PROM_NAME.findall((INFRA / "prometheus" / "alerts.yml").read_text()))
    assert used and used <= METRIC_NAMES, used - METRIC_NAMES
    assert {
        "hostmeter_job_runs_total",
        "hostmeter_job_last_success_timestamp_seconds",
        "hostmeter_job_tenants_processed",
        "hostmeter_job_tenants_expected",
        "hostmeter_snapshot_coverage_ratio",
    } <= used


def _interval_s(schedule: str) -> int:
    """The longest gap between two runs of an EventBridge schedule from the registry."""
    rate = re.fullmatch(r"rate\((\d+) (minute|hour|day)s?\)", schedule)
    if rate:
        return int(rate.group(1)) * {"minute": 60, "hour": 3600, "day": 86400}[rate.group(2)]
    cron = re.fullmatch(r"cron\((\S+) (\S+) (\S+) (\S+) (\S+) (\S+)\)", schedule)
    assert cron, f"unrecognised schedule {schedule!r}: teach this test its interval"
    _minute, hour, day_of_month, month, _dow, _year = cron.groups()
    if hour == "*":
        return 3600
    if day_of_month in ("*", "?"):
        return 86400
    assert month == "*", schedule
    return 31 * 86400


def _run_missing_thresholds() -> dict[str, int]:
    """job -> seconds after which HostmeterScheduledRunMissing fires, read from alerts.yml."""
    rules = (INFRA / "prometheus" / "alerts.yml").read_text()
    rule = re.search(r"- alert: HostmeterScheduledRunMissing\n(.*?)\n\s+for:", rules, re.DOTALL)
    assert rule is not None
    thresholds: dict[str, int] = {}
    for jobs, product in re.findall(r'job=~?"([^"]+)"\}\s*>\s*([\d *]+\d)', rule.group(1)):
        seconds = 1
        for factor in product.split("*"):
            seconds *= int(factor)
        for job in jobs.split("|"):
            thresholds[job] = seconds
    return thresholds


def test_run_missing_alert_waits_two_intervals_of_each_registered_schedule() -> None:
    expected = {name: 2 * _interval_s(spec.schedule) for name, spec in JOBS.items()}
    assert _run_missing_thresholds() == expected


def test_grafana_dashboard_uses_only_exported_metrics_and_shows_them_all() -> None:
    dashboard = json.loads((INFRA / "grafana" / "hostmeter.json").read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    used: set[str] = set()
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            used |= set(_PROM_NAME.findall(target["expr"]))
    everywhere = {name for s in _strings(dashboard) for name in _PROM_NAME.findall(s)}
    assert everywhere <= METRIC_NAMES, everywhere - METRIC_NAMES
    assert used == METRIC_NAMES, METRIC_NAMES - used


def _mackerel_graphs() -> set[str]:
    """Service-metric graph names jobs/mackerel.py produces: the metric name up to its last dot.

    A group with labels (a, b, ...) sorted by key is named ``group.<a>.<b>...``; the last label is
    the series, so the graph is ``group`` plus every label value but the last. Job names come
    from the registry; a group whose leading labels are not ``job`` is not allowed here (its
    values are unknown, so a dashboard could not name them safely).
    """
    graphs: set[str] = set()
    for group in mackerel.GROUPS:
        if not group.labels:
            graphs.add(group.name.rpartition(".")[0])
        elif len(group.labels) == 1:
            graphs.add(group.name)
        elif group.labels[:-1] == ("job",):
            graphs |= {f"{group.name}.{job}" for job in JOBS}
    return graphs


def test_mackerel_dashboard_graphs_are_ones_the_exporter_produces() -> None:
    dashboard = json.loads((INFRA / "mackerel" / "dashboard.json").read_text())
    graphs = [w for w in dashboard["widgets"] if w["type"] == "graph"]
    assert graphs
    known = _mackerel_graphs()
    for widget in graphs:
        graph = widget["graph"]
        assert graph["type"] == "service"
        assert graph["serviceName"] == "hostmeter"
        assert graph["name"] in known, graph["name"]
        layout = widget["layout"]
        assert layout["x"] + layout["width"] <= 24
    shown = {w["graph"]["name"] for w in graphs}
    assert {f"hostmeter.job.runs.{job}" for job in JOBS} <= shown
    not_shown = [
        group.name
        for group in mackerel.GROUPS
        if not any(f"{name}.".startswith(f"{group.name}.") or
                   group.name.startswith(f"{name}.") for name in shown)
    ]  # fmt: skip
    assert not not_shown, f"exported to Mackerel but on no dashboard graph: {not_shown}"


def test_overdue_runs_are_a_gauge_per_job_zero_for_the_others() -> None:
    registry = build_registry((SNAPSHOT, CLOSE), (), expected_jobs=list(JOBS),
                              overdue={"close-billing-period": 2})
    samples = _samples(exposition(registry).decode())
    overdue = {dict(labels)["job"]: value for (name, labels), value in samples.items()
               if name == "hostmeter_job_runs_overdue"}
    assert overdue == {job: (2.0 if job == "close-billing-period" else 0.0) for job in JOBS}


def test_every_job_has_a_mackerel_monitor_on_its_overdue_runs() -> None:
    from jobs.monitoring.logmetrics import OVERDUE
    from jobs.monitoring.metricdata import MetricPoint

    monitors = json.loads((INFRA / "mackerel" / "monitors.json").read_text())
    by_metric = {m["metric"]: m for m in monitors}
    produced = {
        mackerel.mackerel_name(MetricPoint(name=OVERDUE, time=datetime(2026, 1, 1, tzinfo=UTC),
                                           value=Decimal(1), labels={"job": job})): job
        for job in JOBS
    }
    assert set(by_metric) == set(produced)
    assert any(group.name == OVERDUE for group in mackerel.GROUPS)
    for monitor in monitors:
        assert (monitor["type"], monitor["service"], monitor["operator"]) == (
            "service", "hostmeter", ">")
        assert monitor["critical"] == 0 and monitor["duration"] >= 1
