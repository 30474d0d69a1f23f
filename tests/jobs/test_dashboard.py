"""The dashboard page: self-contained, escaped, served over HTTP, and drawn by a real browser.

The browser tests run Debian's Chromium headless (``apt-get install -y chromium``) and are
skipped, with the reason, when ``/usr/bin/chromium`` is missing.
"""

from __future__ import annotations

import html
import re
import struct
import subprocess
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.engine import Engine
from test_logmetrics import finished
from test_tenant_series import ingested, tenant_hour

from billing.errors import UnknownTenant
from jobs.monitoring import dashboard
from jobs.monitoring import logmetrics as lm
from jobs.monitoring.metricdata import (
    DashboardData,
    GrowthRanking,
    HourValue,
    JobStatus,
    MonthBilling,
    MonthEstimates,
    NoisyFlag,
    NoisyFlags,
    RunCompleteness,
    RunFact,
    TenantGrowth,
)

HOSTILE_ERROR = '<script>alert("pwned")</script> database is locked'
HOSTILE_TENANT = "umbrella <corp> & sons"
START = datetime(2026, 11, 2, 0, 5, tzinfo=UTC)


def _run(job: str, i: int, at: datetime, duration: float, status: str = "succeeded",
         error: str | None = None, **counts: object) -> RunFact:
    return RunFact(run_id=f"{job}-{i:03d}", job=job, status=status, finished_at=at,
                   logical_time=at.replace(minute=0), duration_s=duration, counts=counts,
                   error=error)


def sample_data() -> DashboardData:
    """Three days of the four scheduled jobs, with failures, and two billed months."""
    runs: list[RunFact] = []
    for i in range(72):  # hourly
        at = START + timedelta(hours=i, seconds=40 + i % 7)
        status, error = "succeeded", None
        if i == 30:
            status, error = "failed", HOSTILE_ERROR
        elif i == 55:
            status, error = "partial", 'tenant "acme & co": <b>snapshot timeout</b>'
        runs.append(_run("snapshot-usage", i, at, 42.0 + (i * 37) % 40 + i / 4, status, error,
                         tenants_expected=120, tenants_processed=120 - (status != "succeeded")))
    for day in range(3):
        at = START + timedelta(days=day, hours=1)
        runs.append(_run("close-billing-period", day, at, 310.0 + 45 * day,
                         *(("failed", "catalog 2026-11 not found") if day == 1 else ())))
        runs.append(_run("finalize-invoices", day, at + timedelta(hours=2), 118.5 + 9 * day))
        runs.append(_run("prune-usage", day, at + timedelta(hours=4), 12.0 + 3 * day,
                         *(("partial", "2 partitions locked") if day == 2 else ())))

    def job_status(job: str, expected: int | None, processed: int | None,
               failed: int | None) -> JobStatus:
        mine = [r for r in runs if r.job == job]
        counts: dict[str, int] = {"skipped": 2}
        for r in mine:
            counts[r.status] = counts.get(r.status, 0) + 1
        last = max(mine, key=lambda r: r.finished_at)
        ok = [r for r in mine if r.status == "succeeded"]
        return JobStatus(job=job, last_success=max(r.finished_at for r in ok),
                         last_duration_s=last.duration_s, last_status=last.status,
                         runs_by_status=counts, tenants_expected=expected,
                         tenants_processed=processed, tenants_failed=failed)

    latest = START.replace(minute=0) + timedelta(hours=71)
    hours = [latest - timedelta(hours=71 - h) for h in range(72)]
    capacity = {  # a daily cycle on a rising trend; posts miss two hours (a gap)
        "hosts": tuple(HourValue(hour=t, value=1_800 + 4 * i + (60 if 8 <= t.hour < 20 else 0))
                       for i, t in enumerate(hours)),
        "metrics": tuple(HourValue(hour=t, value=180_000 + 500 * i + 9_000 * (t.hour % 3))
                         for i, t in enumerate(hours)),
        "posts": tuple(HourValue(hour=t, value=2_400_000 + 15_000 * (t.hour % 6))
                       for i, t in enumerate(hours) if i not in (40, 41)),
    }
    growth = tuple(
        GrowthRanking(series=series, hour=latest, baseline=latest - timedelta(hours=24),
                      tenants=tuple(TenantGrowth(tenant=t, current=c, previous=p)
                                    for t, c, p in rows))
        for series, rows in (
            ("hosts", [("globex", 140, 100), (HOSTILE_TENANT, 40, 10), ("newco", 20, None),
                       ("acme", 25, 10)]),
            ("metrics", [("acme", 5_000, 1_000), (HOSTILE_TENANT, 4_000, 1_000)])))
    noisy = NoisyFlags(since=latest - timedelta(days=7), total=3, flags=(
        NoisyFlag(series="metrics", tenant="acme", hour=latest, value=5_000,
                  median=Decimal(1_000)),
        NoisyFlag(series="hosts", tenant=HOSTILE_TENANT, hour=latest, value=40,
                  median=Decimal(10)),
        NoisyFlag(series="hosts", tenant="umbrella", hour=latest - timedelta(hours=5),
                  value=60, median=Decimal("15.5")),
    ))
    def complete(job: str, at: datetime, expected: int, processed: int, failed: int,
                 status: str = "succeeded") -> RunCompleteness:
        return RunCompleteness(job=job, run_id=f"{job}-{at:%d%H}", status=status,
                               finished_at=at, expected=expected, processed=processed,
                               failed=failed)

    completeness = (
        complete("close-billing-period", START + timedelta(days=2, hours=1), 120, 118, 2,
                 "partial"),
        complete("close-billing-period", START + timedelta(days=1, hours=1), 120, 120, 0),
        *(complete("snapshot-usage", latest + timedelta(minutes=5 - 60 * h), 120,
                   119 if h == 2 else 120, 1 if h == 2 else 0,
                   "partial" if h == 2 else "succeeded") for h in range(5)),
    )
    return DashboardData(
        estimates=sample_estimates(),
        generated_at=START + timedelta(days=3),
        runs=tuple(runs),
        jobs=(job_status("snapshot-usage", 120, 120, 0),
              job_status("close-billing-period", 120, 118, 2),
              job_status("finalize-invoices", 118, 115, 3),
              job_status("prune-usage", None, None, None)),
        months=(
            MonthBilling(period="2026-09", currency="USD", invoices=112, standard_units=9_840,
                         micro_units=2_130, amount=Decimal("48213.00"), covered_hours=712,
                         hours_in_month=720),
            MonthBilling(period="2026-10", currency="USD", invoices=118, standard_units=10_412,
                         micro_units=2_655, amount=Decimal("51024.50"), covered_hours=744,
                         hours_in_month=744),
        ),
        top_tenants=(("acme", 1_840, Decimal("9120.00")), ("globex", 1_322, Decimal("6610.25")),
                     ("initech", 977, Decimal("4885.00")),
                     (HOSTILE_TENANT, 402, Decimal("2010.75"))),
        malformed_lines=3,
        capacity=capacity,
        growth=growth,
        noisy=noisy,
        completeness=completeness,
    )


EST_START = datetime(2026, 10, 31, 15, tzinfo=UTC)  # November 2026 in Asia/Tokyo
EST_END = datetime(2026, 11, 30, 15, tzinfo=UTC)


def sample_estimates() -> MonthEstimates:
    """Three days of hourly estimates: the fleet's total and three tenants'."""
    hours = [EST_START + timedelta(hours=h) for h in range(1, 73)]
    acme = tuple((h, Decimal(4326 + 10 * i)) for i, h in enumerate(hours))
    globex = tuple((h, Decimal(1833)) for h in hours)
    hostile = tuple((h, Decimal("660.5")) for h in hours[-5:])
    fleet = tuple((h, a + g + (Decimal("660.5") if h in dict(hostile) else 0))
                  for (h, a), (_, g) in zip(acme, globex, strict=True))
    return MonthEstimates(period="2026-11", start=EST_START, end=EST_END, currency="JPY",
                          fleet=fleet, tenants=(("acme", acme), ("globex", globex),
                                                (HOSTILE_TENANT, hostile)))


EMPTY = DashboardData(generated_at=START, runs=(), jobs=(), months=(), top_tenants=())


@pytest.fixture(scope="module")
def data() -> DashboardData:
    return sample_data()


@pytest.fixture(scope="module")
def page(data: DashboardData) -> str:
    return dashboard.render(data)


# --- the HTML ---------------------------------------------------------------------------------


def test_page_loads_nothing_from_anywhere(page: str) -> None:
    assert "http://" not in page and "https://" not in page and "//" not in re.sub(
        r"<script>.*?</script>", "", page, flags=re.S)  # no protocol-relative URLs either
    assert "<script src" not in page and "<link" not in page
    assert not re.search(r"\b(src|href)\s*=", page)
    assert "url(" not in page and "@import" not in page
    assert "Content-Security-Policy" in page and "default-src &#x27;none&#x27;" in page


def test_page_has_every_section_in_order_and_its_charts(page: str) -> None:
    assert re.findall(r'data-section="([^"]*)"', page) == list(dashboard.SECTION_TITLES)
    for title in dashboard.SECTION_TITLES:
        assert f"<h2>{title}</h2>" in page
    charts = re.findall(r'<svg class="chart" data-chart="(\w+)"', page)
    assert charts == ["durations", "statuses", "tenants", "fleet_hosts", "fleet_metrics",
                      "fleet_posts", "coverage", "units", "estimates_fleet",
                      "estimates_tenants"]
    assert len(charts) == dashboard.CHART_COUNT
    for axis in ("Duration (seconds)", "Finished at (UTC)", "Runs (count)", "Tenants (count)",
                 "Billed units (count)", "Snapshot coverage (% of the month&#x27;s hours)"):
        assert f">{axis}</text>" in page


def test_hostile_text_is_escaped(page: str) -> None:
    assert HOSTILE_ERROR not in page and "<b>" not in page and HOSTILE_TENANT not in page
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; database is locked" in page
    assert "umbrella &lt;corp&gt; &amp; sons" in page
    assert page.count("<script>") == 2  # the page's own sentinel scripts, nothing else


def test_page_shows_the_numbers(page: str) -> None:
    assert ">51,024.50</td>" in page and ">48,213.00</td>" in page  # amounts per month
    assert "Amount (USD)" in page and ">2,010.75</td>" in page  # top tenants
    assert "712/720 h (98.9%)" in page and "744/744 h (100.0%)" in page
    assert '<span class="stat-value">3</span>' in page  # malformed lines
    assert ">2.5M</text>" in page and ">250k</text>" in page  # compact fleet axes
    failed = re.findall(r'<table class="failed">.*?</table>', page, re.S)[0]
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>", failed)
    assert rows == [  # newest first
        ("2026-11-04 07:05 UTC", "snapshot-usage", "partial"),
        ("2026-11-04 05:05 UTC", "prune-usage", "partial"),
        ("2026-11-03 06:05 UTC", "snapshot-usage", "failed"),
        ("2026-11-03 01:05 UTC", "close-billing-period", "failed"),
    ]


@pytest.mark.parametrize(("amount", "text"), [
    (Decimal("12345678901234567.89"), "12,345,678,901,234,567.89"),  # beyond float precision
    (Decimal("0.10"), "0.10"),
    (Decimal("4821300"), "4,821,300"),  # JPY has no minor unit
    (Decimal("-120.5"), "-120.5"),
])
def test_money_keeps_every_digit(data: DashboardData, amount: Decimal, text: str) -> None:
    month = replace(data.months[-1], amount=amount)
    assert f">{text}</td>" in dashboard.render(replace(data, months=(month,)))


def test_estimates_panel_draws_the_fleet_and_the_largest_tenants(page: str) -> None:
    panel = re.search(r'data-section="Projected bill this month".*?</section>', page, re.S)
    assert panel
    text = panel.group(0)
    # the note: the latest fleet total, every digit (4326 + 710 + 1833 + 660.5)
    assert ("2026-11: the fleet&#x27;s projected bill is 7,529.5 JPY as of 2026-11-03 15:00 UTC "
            "(72 hourly estimates stored).") in text
    fleet = re.search(r'data-chart="estimates_fleet".*?</svg>', text, re.S)
    tenants = re.search(r'data-chart="estimates_tenants".*?</svg>', text, re.S)
    assert fleet and tenants
    assert fleet.group(0).count("<polyline") == 1
    assert tenants.group(0).count("<polyline") == 3
    assert "acme: 5,036 JPY projected as of 2026-11-03 15:00 UTC" in tenants.group(0)
    assert "umbrella &lt;corp&gt; &amp; sons: 660.5 JPY projected" in tenants.group(0)
    assert ">Projected amount (JPY)</text>" in text and ">Estimate as of (UTC)</text>" in text
    assert dashboard.COLORS["estimate.fleet"] in fleet.group(0)


def test_empty_data_renders_a_page_that_says_so() -> None:
    page = dashboard.render(EMPTY)
    assert re.findall(r'data-section="([^"]*)"', page) == list(dashboard.SECTION_TITLES)
    assert "no runs yet" in page and page.count("No runs yet.") == 3
    assert "No billing months yet." in page and "No invoices yet." in page
    assert "No run has reported tenant counts yet." in page
    assert "No fleet totals yet" in page and "No tenant series yet" in page
    assert "No usage estimates stored for this month yet" in page
    assert "<svg" not in page and "Traceback" not in page


def test_write_puts_the_page_in_a_file(data: DashboardData, page: str, tmp_path: Path) -> None:
    path = dashboard.write(tmp_path / "dashboard.html", data)
    assert path.read_text(encoding="utf-8") == page


# --- the tenant panels, from a store built through the real path -------------------------------

STORE_NOW = datetime(2026, 11, 9, 0, 30, tzinfo=UTC)
LATEST = datetime(2026, 11, 8, 23, 0, tzinfo=UTC)
"""The newest tenant-hour in the store; growth is measured against LATEST - 24 h."""
HOSTILE_NAME = '<img src=x onerror=alert(1)> & "co"'


def _hours(n: int, end: datetime = LATEST) -> list[datetime]:
    return [end - timedelta(hours=n - 1 - i) for i in range(n)]


def store_log() -> str:
    """Three days of tenant-hours (hosts, metrics), some posts, and runs' job_finished lines.

    Hosts grow by: globex +40, HOSTILE_NAME +30, newco +20 (new in the last 3 hours), acme
    +15; initech stays, shrinker shrinks. Flags: at LATEST acme metrics (5x), HOSTILE_NAME
    hosts and metrics (4x); umbrella hosts at LATEST - 5 h (4x); old-spike 9 days back.
    """
    lines = []
    steady = {"acme": (10, 1_000), "globex": (100, 10_000), "initech": (5, 500),
              "shrinker": (50, 5_000), HOSTILE_NAME: (10, 1_000), "umbrella": (15, 1_500)}
    last = {"acme": (25, 5_000), "globex": (140, 12_000), "shrinker": (30, 3_000),
            HOSTILE_NAME: (40, 4_000)}
    for hour in _hours(72):
        for tenant, (hosts, metrics) in steady.items():
            if hour == LATEST:
                hosts, metrics = last.get(tenant, (hosts, metrics))
            if tenant == "umbrella" and hour == LATEST - timedelta(hours=5):
                hosts = 60
            lines.append(tenant_hour(tenant, hour, hosts, 0, metrics))
    lines += [tenant_hour("newco", h, 15, 5, 2_000) for h in _hours(3)]
    spike = LATEST - timedelta(days=9)
    lines += [tenant_hour("old-spike", h, 10, 0, 100) for h in _hours(24, spike)]
    lines.append(tenant_hour("old-spike", spike + timedelta(hours=1), 50, 0, 100))
    lines += [ingested("acme", LATEST + timedelta(minutes=10), 100),
              ingested("globex", LATEST + timedelta(minutes=20), 50),
              ingested("acme", LATEST - timedelta(minutes=55), 30)]
    for i, hour in enumerate(_hours(6)):  # snapshot-usage: the run 2 hours back lost a tenant
        at = (hour + timedelta(hours=1, minutes=2)).isoformat()
        short = hour == LATEST - timedelta(hours=2)
        lines.append(finished(f"snap-{i}", "snapshot-usage", "partial" if short else "succeeded",
                              at, 4.5, tenants_expected=7, tenants_processed=6 if short else 7,
                              tenants_failed=1 if short else 0))
    lines += [
        finished("close-1", "close-billing-period", "succeeded",
                 (STORE_NOW - timedelta(days=8)).isoformat(), 30.0, tenants_expected=6,
                 tenants_processed=6, tenants_failed=0),
        finished("close-0", "close-billing-period", "partial",  # older than the window
                 (STORE_NOW - timedelta(days=40)).isoformat(), 30.0, tenants_expected=6,
                 tenants_processed=3, tenants_failed=3),
        finished("agg-1", "aggregate-job-logs", "succeeded", STORE_NOW.isoformat(), 0.2,
                 runs=7),
        finished("prune-1", "prune-usage", "succeeded", STORE_NOW.isoformat(), 1.0,
                 tenants_expected=None),
    ]
    return "".join(lines)


def build_store(engine: Engine, tmp_path: Path) -> DashboardData:
    log = tmp_path / "hostmeter.jsonl"
    log.write_text(store_log(), encoding="utf-8")
    lm.aggregate(engine, [log], now=STORE_NOW)
    return lm.dashboard_data(engine, ZoneInfo("Asia/Tokyo"), now=STORE_NOW)


def table_rows(page: str, css: str, nth: int = 0) -> list[tuple[str, tuple[str, ...]]]:
    """(row class, unescaped cell texts) of the ``nth`` ``<table class="css">`` of the page."""
    table = re.findall(rf'<table class="{css}">.*?</table>', page, re.S)[nth]
    body = table.split("<tbody>", 1)[1]
    return [(cls, tuple(html.unescape(c) for c in re.findall(r"<td[^>]*>([^<]*)</td>", row)))
            for cls, row in re.findall(r'<tr(?: class="([^"]*)")?>(.*?)</tr>', body, re.S)]


@pytest.fixture
def store_page(engine: Engine, tmp_path: Path) -> str:
    return dashboard.render(build_store(engine, tmp_path))


def test_top_growth_ranks_the_latest_hour_against_the_day_before(store_page: str) -> None:
    assert "2026-11-08 23:00 UTC vs 2026-11-07 23:00 UTC (a day before)" in store_page
    hosts = [cells for _, cells in table_rows(store_page, "growth", 0)]
    assert hosts == [  # initech (no growth) and shrinker (shrank) are not ranked
        ("1", "globex", "140", "100", "+40", "+40.0%"),
        ("2", HOSTILE_NAME, "40", "10", "+30", "+300.0%"),
        ("3", "newco", "20", "—", "+20", "new"),
        ("4", "acme", "25", "10", "+15", "+150.0%"),
    ]
    metrics = [cells[1:5] for _, cells in table_rows(store_page, "growth", 1)]
    assert metrics == [("acme", "5,000", "1,000", "+4,000"),
                       (HOSTILE_NAME, "4,000", "1,000", "+3,000"),
                       ("globex", "12,000", "10,000", "+2,000"),  # a tie: by name
                       ("newco", "2,000", "—", "+2,000")]


def test_top_growth_is_limited_to_n(engine: Engine, tmp_path: Path) -> None:
    build_store(engine, tmp_path)
    with engine.connect() as conn:
        ranked = lm.growth_rankings(conn, top=2)
    assert [(r.series, [t.tenant for t in r.tenants]) for r in ranked] == [
        ("hosts", ["globex", HOSTILE_NAME]), ("metrics", ["acme", HOSTILE_NAME])]


def test_flagged_tenant_hours_of_the_last_week_newest_first(store_page: str) -> None:
    assert "4 flagged since 2026-11-02 00:00 UTC." in store_page  # not old-spike's
    rows = [cells for _, cells in table_rows(store_page, "flags")]
    assert rows == [  # within an hour, the largest jump first
        ("2026-11-08 23:00 UTC", "acme", "metrics", "5,000", "1,000", "5.0×"),
        ("2026-11-08 23:00 UTC", HOSTILE_NAME, "hosts", "40", "10", "4.0×"),
        ("2026-11-08 23:00 UTC", HOSTILE_NAME, "metrics", "4,000", "1,000", "4.0×"),
        ("2026-11-08 18:00 UTC", "umbrella", "hosts", "60", "15", "4.0×"),
    ]


def test_flags_are_bounded_by_rows_and_days(engine: Engine, tmp_path: Path) -> None:
    build_store(engine, tmp_path)
    with engine.connect() as conn:
        few = lm.noisy_flags(conn, now=STORE_NOW, limit=2)
        longer = lm.noisy_flags(conn, now=STORE_NOW, days=10)
    assert (len(few.flags), few.total) == (2, 4)
    assert "Newest 2 of 4 flagged since" in dashboard.render(replace(EMPTY, noisy=few))
    assert longer.total == 5 and longer.flags[-1].tenant == "old-spike"


def test_completeness_shows_the_latest_runs_and_highlights_the_short_one(
        store_page: str) -> None:
    assert "1 of 6 runs processed fewer tenants than they expected" in store_page
    rows = [(css, cells[0], cells[2:]) for css, cells in table_rows(store_page, "completeness")]
    assert rows == [  # the latest 5 of snapshot-usage's 6; close-billing's of 40 days ago and
        # runs reporting no tenant counts (aggregate-job-logs, prune-usage's null) are not shown
        ("", "close-billing-period", ("succeeded", "6", "6", "0", "0")),
        ("", "snapshot-usage", ("succeeded", "7", "7", "0", "0")),
        ("", "snapshot-usage", ("succeeded", "7", "7", "0", "0")),
        ("short", "snapshot-usage", ("partial", "7", "6", "1", "−1")),
        ("", "snapshot-usage", ("succeeded", "7", "7", "0", "0")),
        ("", "snapshot-usage", ("succeeded", "7", "7", "0", "0")),
    ]
    finished_at = [cells[1] for _, cells in table_rows(store_page, "completeness")]
    assert finished_at[1] == "2026-11-09 00:02 UTC"


def test_capacity_charts_the_fleet_totals_per_hour(store_page: str) -> None:
    charts = re.findall(r'<svg class="chart" data-chart="(\w+)"', store_page)
    assert charts == ["durations", "statuses", "tenants", "fleet_hosts", "fleet_metrics",
                      "fleet_posts"]
    # hosts at LATEST: 25 + 140 + 5 + 30 + 40 + 20 + 15; posts: 100 + 50 in it, 30 the hour before
    assert "latest 275 at 2026-11-08 23:00 UTC" in store_page
    assert "latest 150 at 2026-11-08 23:00 UTC" in store_page
    posts = re.search(r'data-chart="fleet_posts".*?</svg>', store_page, re.S)
    assert posts and posts.group(0).count("<polyline") == 1  # two hours in a row: one line


def test_tenant_names_are_escaped_in_every_panel(store_page: str) -> None:
    assert HOSTILE_NAME not in store_page and "<img" not in store_page
    escaped = "&lt;img src=x onerror=alert(1)&gt; &amp; &quot;co&quot;"
    assert store_page.count(escaped) == 4  # hosts and metrics growth, two flags
    assert store_page.count("<script>") == 2


def test_estimates_panel_reads_what_estimate_usage_stored(engine: Engine) -> None:
    """Three hourly runs of estimate-usage over two tenants → the panel of the month they are
    in (and none for a month with no estimates)."""
    from jobs import estimate_usage, snapshot_usage
    from jobs.runtime.context import JobContext, run_job
    from metering.ingest import UsageRecorder
    from metering.records import HostPost, PlanChange, Record
    from metering.settings import Settings

    zone = ZoneInfo("Asia/Tokyo")
    first = EST_START  # 2026-11-01 00:00 in Tokyo
    posts: list[Record] = [PlanChange(tenant=t, plan="standard", at=first)
                           for t in ("acme", HOSTILE_NAME)]
    posts += [HostPost(tenant=t, host=f"h{i}", kind="standard",
                       at=first + timedelta(hours=h, minutes=5), metrics=("loadavg5",))
              for h in range(3) for t, n in (("acme", 4), (HOSTILE_NAME, 1)) for i in range(n)]
    UsageRecorder(engine).record(posts)
    ctx = JobContext(engine=engine, settings=Settings())
    hours = [first + timedelta(hours=h) for h in range(3)]
    assert run_job("snapshot-usage", snapshot_usage.run, ctx, first, hours=hours).ok
    for h in hours:
        assert run_job("estimate-usage", estimate_usage.run, ctx,
                       h + timedelta(hours=1, minutes=15)).ok
    now = first + timedelta(hours=3, minutes=20)
    est = lm.dashboard_data(engine, zone, now=now).estimates
    assert est is not None
    assert (est.period, est.start, est.end, est.currency) == ("2026-11", EST_START, EST_END,
                                                              "JPY")
    assert [at for at, _ in est.fleet] == [h + timedelta(hours=1) for h in hours]
    # projected from the hours so far: acme 4 hosts → 4 units, the other 1 → 1 unit
    assert est.fleet[-1][1] == Decimal(5 * 1833)
    assert [(k, pts[-1][1]) for k, pts in est.tenants] == [
        ("acme", Decimal(4 * 1833)), (HOSTILE_NAME, Decimal(1833))]
    page = dashboard.render(lm.dashboard_data(engine, zone, now=now))
    assert 'data-chart="estimates_tenants"' in page and HOSTILE_NAME not in page
    assert lm.dashboard_data(engine, zone, now=EST_END + timedelta(days=3)).estimates is None

    # A tenant asked for by name (hostmeter dashboard --tenant) instead of the largest ones.
    chosen = lm.dashboard_data(engine, zone, now=now, tenants=(HOSTILE_NAME,))
    assert chosen.estimates is not None and chosen.estimates.chosen
    assert [(k, [v for _, v in pts]) for k, pts in chosen.estimates.tenants] == [
        (HOSTILE_NAME, [Decimal(1833)] * 3)]
    assert "<h3>Chosen tenants</h3>" in dashboard.render(chosen)
    with pytest.raises(UnknownTenant):
        lm.dashboard_data(engine, zone, now=now, tenants=("nobody",))


# --- the server -------------------------------------------------------------------------------


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read().decode("utf-8")


@pytest.fixture
def served(data: DashboardData) -> Iterator[tuple[str, list[int]]]:
    """The sample page served on a free port; each build counts a malformed line more."""
    builds: list[int] = []

    def build() -> DashboardData:
        builds.append(len(builds) + 1)
        return replace(data, malformed_lines=1000 + builds[-1])

    server, port = dashboard.serve(0, build)
    try:
        yield f"http://127.0.0.1:{port}/", builds
    finally:
        server.stop()


def test_serve_renders_afresh_on_every_request(served: tuple[str, list[int]]) -> None:
    url, builds = served
    status, ctype, first = _get(url)
    assert (status, ctype) == (200, "text/html; charset=utf-8")
    assert '<span class="stat-value">1,001</span>' in first
    assert '<span class="stat-value">1,002</span>' in _get(url)[2]
    assert builds == [1, 2]
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(url + "elsewhere")
    assert err.value.code == 404


def test_serve_stops_and_frees_the_port(data: DashboardData) -> None:
    server, port = dashboard.serve(0, lambda: data)
    assert port > 0 and _get(f"http://127.0.0.1:{port}/")[0] == 200
    server.stop()
    assert not server.thread.is_alive()
    with pytest.raises(urllib.error.URLError):
        _get(f"http://127.0.0.1:{port}/")


# --- a real browser ---------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium)")


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium that makes no connection of its own (this machine's network is
    closed) and keeps its profile in a throwaway directory."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
             f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=30, check=False)


def png_pixels(path: Path) -> tuple[int, int, set[bytes]]:
    """(width, height, distinct RGB colors) of an 8-bit RGB or RGBA PNG, standard library only."""
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, bytearray()
    width = height = bpp = 0
    while pos < len(blob):
        (length,), kind = struct.unpack(">I", blob[pos:pos + 4]), blob[pos + 4:pos + 8]
        chunk = blob[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(bytes(idat))
    stride = width * bpp
    prev = bytearray(stride)
    colors: set[bytes] = set()
    for y in range(height):
        start = y * (stride + 1)
        method, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if method == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif method == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif method == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif method == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        colors.update(bytes(line[i:i + 3]) for i in range(0, stride, bpp))
        prev = line
    return width, height, colors


def _rgb(color: str) -> bytes:
    return bytes.fromhex(color.lstrip("#"))


@needs_chromium
def test_chromium_draws_every_chart_without_script_errors(
        served: tuple[str, list[int]], tmp_path: Path) -> None:
    url, _ = served
    dom = chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<pre id="errors"></pre>' in dom.stdout, re.findall(
        r'<pre id="errors">(.*?)</pre>', dom.stdout, re.S)
    # set by the page's script after layout: charts with a size and shapes in them
    assert f'data-rendered="{dashboard.CHART_COUNT}"' in dom.stdout

    shot = tmp_path / "dashboard.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1280,3000", url)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    width, height, colors = png_pixels(shot)
    assert (width, height) == (1280, 3000)
    assert len(colors) > 50, f"a near-blank screenshot: {len(colors)} colors"
    for name in ("status.succeeded", "status.failed", "processed", "covered", "standard",
                 "fleet.hosts", "fleet.metrics", "fleet.posts", "short"):
        assert _rgb(dashboard.COLORS[name]) in colors, f"no {name} fill on the screenshot"


@needs_chromium
def test_chromium_draws_the_tenant_panels_built_from_the_store(
        store_page: str, tmp_path: Path) -> None:
    path = tmp_path / "store.html"
    path.write_text(store_page, encoding="utf-8")
    dom = chromium("--dump-dom", path.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<pre id="errors"></pre>' in dom.stdout, re.findall(
        r'<pre id="errors">(.*?)</pre>', dom.stdout, re.S)
    assert 'data-rendered="6"' in dom.stdout  # no billing: no coverage or units chart
    for title in ("Completeness per job", "Capacity over time", "Top tenants by growth",
                  "Flagged noisy neighbours"):
        assert f"<h2>{title}</h2>" in dom.stdout

    shot = tmp_path / "store.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1280,2400", path.as_uri())
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    _, _, colors = png_pixels(shot)
    assert len(colors) > 50, f"a near-blank screenshot: {len(colors)} colors"
    for name in ("fleet.hosts", "fleet.metrics", "fleet.posts", "short"):
        assert _rgb(dashboard.COLORS[name]) in colors, f"no {name} fill on the screenshot"


@needs_chromium
def test_chromium_sentinel_reports_a_blocked_load_and_a_script_error(
        page: str, tmp_path: Path) -> None:
    """The sentinel is what the test above trusts: it must speak up when something breaks."""
    broken = page.replace(
        "</main>", '</main><img src="http://192.0.2.1/x.png"><script>nope(</script>')
    path = tmp_path / "broken.html"
    path.write_text(broken, encoding="utf-8")
    dom = chromium("--dump-dom", path.as_uri())
    errors = re.findall(r'<pre id="errors">(.*?)</pre>', dom.stdout, re.S)
    assert errors and "blocked: img-src http://192.0.2.1/x.png" in errors[0], dom.stdout[-500:]
    assert "error: " in errors[0]
