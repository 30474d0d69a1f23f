"""The dashboard page: self-contained, escaped, served over HTTP, and drawn by a real browser.

The browser tests run Debian's Chromium headless (``apt-get install -y chromium``) and are
skipped, with the reason, when ``/usr/bin/chromium`` is missing.
"""

from __future__ import annotations

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

import pytest

from jobs.monitoring import dashboard
from jobs.monitoring.metricdata import DashboardData, JobStatus, MonthBilling, RunFact

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

    return DashboardData(
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
    )


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
    assert charts == ["durations", "statuses", "tenants", "coverage", "units"]
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


def test_empty_data_renders_a_page_that_says_so() -> None:
    page = dashboard.render(EMPTY)
    assert re.findall(r'data-section="([^"]*)"', page) == list(dashboard.SECTION_TITLES)
    assert "no runs yet" in page and page.count("No runs yet.") == 3
    assert "No billing months yet." in page and "No invoices yet." in page
    assert "<svg" not in page and "Traceback" not in page


def test_write_puts_the_page_in_a_file(data: DashboardData, page: str, tmp_path: Path) -> None:
    path = dashboard.write(tmp_path / "dashboard.html", data)
    assert path.read_text(encoding="utf-8") == page


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
    result = chromium(f"--screenshot={shot}", "--window-size=1280,1400", url)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    width, height, colors = png_pixels(shot)
    assert (width, height) == (1280, 1400)
    assert len(colors) > 50, f"a near-blank screenshot: {len(colors)} colors"
    for name in ("status.succeeded", "status.failed", "processed", "covered", "standard"):
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
