from __future__ import annotations

import io
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from structlog.testing import capture_logs

from jobs.monitoring.mackerel import (
    GROUPS,
    MackerelError,
    MackerelExporter,
    graph_definitions,
    mackerel_name,
)
from jobs.monitoring.metricdata import MetricPoint
from jobs.runtime.logconfig import configure_logging

KEY = "mkr-SECRET-4f9a2c"
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def point(
    minutes_ago: float, value: str = "1", name: str = "hostmeter.job.runs", **labels: str
) -> MetricPoint:
    return MetricPoint(
        name=name, time=NOW - timedelta(minutes=minutes_ago), value=Decimal(value), labels=labels
    )


@dataclass
class Fake:
    """A Mackerel stand-in: answers each request with the next status (the last one repeats)."""

    statuses: list[int] = field(default_factory=lambda: [200])
    headers: dict[int, dict[str, str]] = field(default_factory=dict)
    body: str = '{"success": true}'
    requests: list[httpx.Request] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)
    raises: dict[int, Exception] = field(default_factory=dict)
    """Request index → the transport error raised instead of answering."""
    t: float = 0.0
    """The fake monotonic clock: advanced by every sleep and ``request_s`` per request."""
    request_s: float = 0.0

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.t += self.request_s
        i = len(self.requests) - 1
        if i in self.raises:
            raise self.raises[i]
        status = self.statuses[min(i, len(self.statuses) - 1)]
        return httpx.Response(status, headers=self.headers.get(i, {}), text=self.body)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds

    def exporter(self, **kwargs: Any) -> MackerelExporter:
        client = httpx.Client(transport=httpx.MockTransport(self.handle))
        return MackerelExporter(
            KEY, "hostmeter", client=client, sleep=self.sleep, monotonic=lambda: self.t,
            clock=lambda: NOW, **kwargs,
        )  # fmt: skip

    def bodies(self) -> list[list[dict[str, Any]]]:
        return [json.loads(r.content) for r in self.requests]


@pytest.mark.parametrize(
    ("name", "labels", "expected"),
    [
        ("hostmeter.job.runs", {"job": "snapshot-usage", "status": "succeeded"},
         "hostmeter.job.runs.snapshot-usage.succeeded"),
        ("hostmeter.job.runs", {"status": "failed", "job": "close-billing-period"},
         "hostmeter.job.runs.close-billing-period.failed"),
        ("hostmeter.billing.amount", {"currency": "JPY"}, "hostmeter.billing.amount.JPY"),
        ("hostmeter.job.tenants", {"job": "a b/c", "state": "fäiled:1"},
         "hostmeter.job.tenants.a_b_c.f_iled_1"),
        ("hostmeter.logs.malformed_lines", {}, "hostmeter.logs.malformed_lines"),
    ],
)  # fmt: skip
def test_mackerel_name_orders_labels_by_key_and_sanitises(
    name: str, labels: dict[str, str], expected: str
) -> None:
    p = MetricPoint(name=name, time=NOW, value=Decimal(1), labels=labels)
    assert mackerel_name(p) == expected


def test_export_posts_json_points_with_the_api_key() -> None:
    fake = Fake()
    p1 = point(10, "3", job="snapshot-usage", status="succeeded")
    p2 = point(5, "0.25", name="hostmeter.job.duration_s", job="snapshot-usage")
    result = fake.exporter().export([p2, p1])

    (request,) = fake.requests
    assert request.method == "POST"
    assert str(request.url) == "https://api.mackerelio.com/api/v0/services/hostmeter/tsdb"
    assert request.headers["X-Api-Key"] == KEY
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == [
        {"name": "hostmeter.job.runs.snapshot-usage.succeeded",
         "time": int(p1.time.timestamp()), "value": 3.0},
        {"name": "hostmeter.job.duration_s.snapshot-usage",
         "time": int(p2.time.timestamp()), "value": 0.25},
    ]  # fmt: skip
    body = fake.bodies()[0]
    assert all(type(m["time"]) is int and type(m["value"]) is float for m in body)
    assert result.sent == 2 and result.batches == 1 and result.skipped_old == 0
    assert result.last_time == p2.time


def test_export_batches_in_time_order() -> None:
    fake = Fake()
    points = [point(300 - i, str(i), job=f"j{i % 7}", status="succeeded") for i in range(250)]
    random.Random(4).shuffle(points)
    result = fake.exporter(batch_size=100).export(points)

    assert [len(b) for b in fake.bodies()] == [100, 100, 50]
    times = [m["time"] for b in fake.bodies() for m in b]
    assert times == sorted(times) and len(set(times)) == 250
    assert result.sent == 250 and result.batches == 3
    assert result.last_time == NOW - timedelta(minutes=51)


def test_points_older_than_24_hours_are_skipped_with_a_warning() -> None:
    fake = Fake()
    old, older, fresh = point(24 * 60 + 1), point(30 * 60), point(24 * 60 - 1)
    with capture_logs() as logs:
        result = fake.exporter().export([old, fresh, older])

    assert [m["time"] for m in fake.bodies()[0]] == [int(fresh.time.timestamp())]
    assert result.sent == 1 and result.skipped_old == 2
    (warning,) = [e for e in logs if e["event"] == "mackerel_points_too_old"]
    assert warning["log_level"] == "warning"
    assert warning["count"] == 2 and warning["oldest"] == older.time.isoformat()


def test_only_old_points_sends_nothing() -> None:
    fake = Fake()
    result = fake.exporter().export([point(25 * 60)])
    assert fake.requests == []
    assert result.sent == 0 and result.batches == 0 and result.last_time is None


def test_429_and_503_are_retried_with_retry_after_and_exponential_backoff() -> None:
    fake = Fake(statuses=[429, 503, 503, 200], headers={0: {"Retry-After": "7"}})
    with capture_logs() as logs:
        result = fake.exporter(backoff_s=0.5).export([point(1), point(2)])

    assert fake.sleeps == [7.0, 1.0, 2.0]  # Retry-After, then 0.5 * 2**1, 0.5 * 2**2
    assert len(fake.requests) == 4 and len({r.content for r in fake.requests}) == 1
    assert result.sent == 2
    retries = [e for e in logs if e["event"] == "mackerel_retry"]
    assert [e["status"] for e in retries] == [429, 503, 503]


def test_final_failure_reports_how_far_delivery_got() -> None:
    fake = Fake(statuses=[200, 200, 503], body=f"upstream down, key {KEY}")
    points = [point(60 - i) for i in range(6)]
    with pytest.raises(MackerelError) as info:
        fake.exporter(batch_size=2, max_attempts=3).export(points)

    err = info.value
    assert len(fake.requests) == 2 + 3 and fake.sleeps == [1.0, 2.0]
    assert err.sent_until == points[3].time and err.sent == 4 and err.status == 503
    assert "503" in str(err) and "\n" not in str(err)
    assert KEY not in str(err) and KEY not in repr(err.context)
    # the batch that failed is the one after sent_until: nothing beyond it was claimed
    assert [m["time"] for m in fake.bodies()[-1]] == [int(p.time.timestamp()) for p in points[4:]]


def test_sent_until_never_passes_a_timestamp_split_across_batches() -> None:
    fake = Fake(statuses=[200, 500])
    first = point(10)
    same_time = [point(5, job="a"), point(5, job="b")]
    with pytest.raises(MackerelError) as info:
        fake.exporter(batch_size=2, max_attempts=1).export([*same_time, first])

    assert [len(b) for b in fake.bodies()] == [2, 1]  # the second point at 5 min was not sent
    assert info.value.sent_until == first.time


def test_failure_in_the_first_batch_has_no_sent_until() -> None:
    fake = Fake(statuses=[502])
    with pytest.raises(MackerelError) as info:
        fake.exporter(max_attempts=2).export([point(1)])
    assert info.value.sent_until is None and info.value.sent == 0


def test_other_4xx_is_not_retried() -> None:
    fake = Fake(statuses=[400, 200], body=f'{{"error": "bad name", "echo": "{KEY}"}}')
    with pytest.raises(MackerelError) as info:
        fake.exporter().export([point(1)])

    assert len(fake.requests) == 1 and fake.sleeps == []
    assert info.value.status == 400 and "400" in str(info.value)
    assert KEY not in str(info.value)


def test_retry_after_longer_than_the_time_left_ends_the_export_at_once() -> None:
    fake = Fake(statuses=[429], headers={0: {"Retry-After": "120"}}, request_s=0.5)
    with pytest.raises(MackerelError) as info:
        fake.exporter().export([point(1), point(2)], deadline=30.0)

    err = info.value
    assert fake.sleeps == [] and len(fake.requests) == 1  # no 2-minute wait inside the pass
    assert err.status == 429 and "ran out of time" in str(err) and "2 points" in str(err)
    # Mackerel's wish is reported, counted from when it was made (0.5 s into the pass)
    assert err.retry_at == NOW + timedelta(seconds=120.5)
    assert err.partial is not None and err.partial.delivered == ()


def test_backoff_never_sleeps_past_the_deadline() -> None:
    fake = Fake(statuses=[503], request_s=0.25)
    with pytest.raises(MackerelError) as info:
        fake.exporter(max_attempts=10).export([point(1)], deadline=5.0)

    assert fake.sleeps == [1.0, 2.0]  # the next wait (4 s) would end past the deadline
    assert fake.t < 5.0 and len(fake.requests) == 3
    assert info.value.retry_at is None and "ran out of time" in str(info.value)


def test_no_request_starts_once_the_deadline_has_passed() -> None:
    fake = Fake(t=10.0)
    with pytest.raises(MackerelError) as info:
        fake.exporter().export([point(1)], deadline=10.0)
    assert fake.requests == [] and "not tried" in str(info.value)


def test_request_timeouts_are_cut_to_the_time_left() -> None:
    fake = Fake(request_s=2.0)  # each request takes 2 s of the 12.5 s left
    client = httpx.Client(transport=httpx.MockTransport(fake.handle), timeout=10.0)
    exporter = MackerelExporter(KEY, "hostmeter", client=client, batch_size=1,
                                monotonic=lambda: fake.t, clock=lambda: NOW)  # fmt: skip
    exporter.export([point(3), point(2), point(1)], deadline=12.5)

    timeouts = [r.extensions["timeout"] for r in fake.requests]
    assert [t["read"] for t in timeouts] == [10.0, 10.0, 8.5]
    assert all(t["connect"] == t["read"] == t["write"] == t["pool"] for t in timeouts)


def test_a_request_cut_off_after_sending_leaves_its_points_in_doubt() -> None:
    fake = Fake(raises={0: httpx.ReadTimeout("late")}, statuses=[200])
    first, second = point(2), point(1)
    result = fake.exporter(batch_size=1).export([first, second])

    # retried into success, but the first request may still land: delivered *and* in doubt
    assert len(fake.requests) == 3 and fake.sleeps == [1.0]
    assert result.delivered == (first, second) and result.in_doubt == (first,)


def test_a_request_that_never_left_is_not_in_doubt() -> None:
    fake = Fake(raises={0: httpx.ConnectError("refused"), 1: httpx.ConnectTimeout("slow")})
    result = fake.exporter().export([point(1)])
    assert len(fake.requests) == 3 and result.in_doubt == ()


def test_a_final_timeout_reports_the_batch_in_doubt_and_not_delivered() -> None:
    fake = Fake(statuses=[200], raises={1: httpx.ReadTimeout("late")})
    points = [point(2), point(1)]
    with pytest.raises(MackerelError) as info:
        fake.exporter(batch_size=1, max_attempts=1).export(points)
    partial = info.value.partial
    assert partial is not None
    assert partial.delivered == (points[0],) and partial.in_doubt == (points[1],)
    assert info.value.sent_until == points[0].time


def test_graph_definitions_are_posted_and_match_the_exported_names() -> None:
    fake = Fake()
    assert fake.exporter(base_url="https://mackerel.example/").post_graph_definitions() is True

    (request,) = fake.requests
    assert str(request.url) == "https://mackerel.example/api/v0/graph-defs/create"
    assert request.headers["X-Api-Key"] == KEY
    assert json.loads(request.content) == graph_definitions()
    defs = {d["name"]: d for d in graph_definitions()}
    assert defs["custom.hostmeter.job.runs.#"]["metrics"] == [
        {"name": "custom.hostmeter.job.runs.#.*", "isStacked": False}
    ]
    # the fleet totals are one graph with a metric each; every other group is its own graph
    assert defs["custom.hostmeter.fleet"]["metrics"] == [
        {"name": f"custom.hostmeter.fleet.{s}", "isStacked": False}
        for s in ("hosts", "metrics", "posts")]
    assert len(defs) == len(GROUPS) - 2 == len(graph_definitions())
    # every group's exported name matches a metric pattern of exactly one definition
    patterns = [m["name"].replace("#", "x").replace("*", "x")
                for d in graph_definitions() for m in d["metrics"]]
    names = []
    for group in GROUPS:
        sample = MetricPoint(
            name=group.name, time=NOW, value=Decimal(1), labels={k: "x" for k in group.labels}
        )
        names.append("custom." + mackerel_name(sample))
    assert sorted(patterns) == sorted(names)


def test_fleet_and_noisy_names_are_valid_mackerel_names_as_they_are() -> None:
    from jobs.monitoring.tenants import FLEET_METRICS, NOISY

    for name in (*FLEET_METRICS.values(), NOISY):
        point = MetricPoint(name=name, time=NOW, value=Decimal(1), labels={})
        assert mackerel_name(point) == name  # nothing had to be replaced
        assert any(group.name == name and group.labels == () for group in GROUPS)


def test_repr_does_not_show_the_key() -> None:
    exporter = Fake().exporter()
    assert KEY not in repr(exporter) and "hostmeter" in repr(exporter)


# --- a real HTTP server on 127.0.0.1 -------------------------------------------------------


@dataclass
class Seen:
    path: str
    api_key: str | None
    content_type: str | None
    body: list[dict[str, Any]]


@pytest.fixture
def server() -> Iterator[tuple[str, list[Seen], list[int]]]:
    """A local server that records requests and answers with the queued statuses, then 200."""
    seen: list[Seen] = []
    statuses: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            seen.append(
                Seen(self.path, self.headers.get("X-Api-Key"), self.headers.get("Content-Type"),
                     json.loads(self.rfile.read(length)))
            )  # fmt: skip
            status = statuses.pop(0) if statuses else 200
            payload = b'{"success": true}' if status == 200 else b'{"error": "boom"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_args: object) -> None:  # keep test output quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen, statuses
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_real_server_gets_every_point_after_a_500(
    server: tuple[str, list[Seen], list[int]],
) -> None:
    base_url, seen, statuses = server
    statuses.append(500)
    sleeps: list[float] = []
    points = [point(30 - i, str(i), job="snapshot-usage", status="succeeded") for i in range(5)]
    with httpx.Client(timeout=5) as client:
        exporter = MackerelExporter(
            KEY, "hostmeter", base_url=base_url, client=client, batch_size=2,
            sleep=sleeps.append, clock=lambda: NOW,
        )  # fmt: skip
        result = exporter.export(points)

    assert result.sent == 5 and result.batches == 3 and result.last_time == points[-1].time
    assert sleeps == [1.0]
    assert len(seen) == 4 and seen[0].body == seen[1].body  # the 500'd batch was sent again
    assert {s.path for s in seen} == {"/api/v0/services/hostmeter/tsdb"}
    assert {s.api_key for s in seen} == {KEY}
    assert {s.content_type for s in seen} == {"application/json"}
    received = [m["value"] for s in seen[1:] for m in s.body]
    assert received == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_real_server_answering_after_the_timeout_leaves_the_batch_in_doubt() -> None:
    from mackerelfake import Fault, MackerelStandIn

    points = [point(10 - i, str(i), job="snapshot-usage", status="succeeded") for i in range(3)]
    with MackerelStandIn(KEY, late_s=1.0) as mackerel, httpx.Client(timeout=0.3) as client:
        mackerel.then(Fault.late())  # stores the points, answers after the client gave up
        exporter = MackerelExporter(KEY, "hostmeter", base_url=mackerel.base_url, client=client,
                                    backoff_s=0.05, clock=lambda: NOW)  # fmt: skip
        result = exporter.export(points, deadline=time.monotonic() + 5)
        held = mackerel.state()

    assert [r.fault.kind for r in mackerel.tsdb_requests()] == ["late", "ok"]
    assert result.delivered == tuple(points) and result.in_doubt == tuple(points)
    assert held == {"hostmeter.job.runs.snapshot-usage.succeeded": {
        int(p.time.timestamp()): float(p.value) for p in points}}


def test_real_server_hanging_costs_no_more_than_the_time_left() -> None:
    from mackerelfake import Fault, MackerelStandIn

    with MackerelStandIn(KEY) as mackerel, httpx.Client(timeout=30) as client:
        mackerel.always(Fault.hang())
        exporter = MackerelExporter(KEY, "hostmeter", base_url=mackerel.base_url, client=client,
                                    clock=lambda: NOW)  # fmt: skip
        start = time.monotonic()
        with pytest.raises(MackerelError) as info:
            exporter.export([point(1)], deadline=start + 1.0)
        elapsed = time.monotonic() - start

    assert elapsed < 2.0, elapsed
    assert info.value.partial is not None and len(info.value.partial.in_doubt) == 1


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_unreachable_endpoint_raises_a_one_line_error_after_retries() -> None:
    sleeps: list[float] = []
    with httpx.Client(timeout=2) as client:
        exporter = MackerelExporter(
            KEY, "hostmeter", base_url=f"http://127.0.0.1:{_closed_port()}", client=client,
            max_attempts=3, sleep=sleeps.append, clock=lambda: NOW,
        )  # fmt: skip
        with pytest.raises(MackerelError) as info:
            exporter.export([point(1)])

    err = info.value
    assert sleeps == [1.0, 2.0]
    assert err.status is None and err.sent_until is None
    assert "after 3 attempts" in str(err) and "connection error" in str(err)
    assert "\n" not in str(err) and KEY not in str(err)


# --- the key never reaches a log sink ------------------------------------------------------


@pytest.fixture
def log_sinks(tmp_path: Path) -> Iterator[Callable[[], str]]:
    stream = io.StringIO()
    path = configure_logging(str(tmp_path), stream=stream, stderr_level="debug")
    assert path is not None
    try:
        yield lambda: path.read_text() + stream.getvalue()
    finally:
        configure_logging(None, stream=io.StringIO())
        structlog.reset_defaults()


def test_api_key_never_appears_in_any_log(log_sinks: Callable[[], str]) -> None:
    fake = Fake(statuses=[200, 429, 503, 401], headers={1: {"Retry-After": "1"}},
                body=f"invalid api key {KEY}")  # fmt: skip
    exporter = fake.exporter(batch_size=1)
    with pytest.raises(MackerelError) as info:
        exporter.export([point(25 * 60), point(2), point(1)])
    structlog.get_logger().error("export_failed", error=str(info.value), exporter=repr(exporter))

    written = log_sinks()
    for event in ("mackerel_points_too_old", "mackerel_retry", "mackerel_export_failed"):
        assert event in written
    assert KEY not in written
