"""The metrics pipeline end to end: job logs → store → Mackerel (checkpointed) / Prometheus /
dashboard, on both backends."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from mackerelfake import Fault, MackerelStandIn, store_state
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from jobs import aggregate_job_logs
from jobs.monitoring import logmetrics as lm
from jobs.monitoring.exports import (
    DEFAULT_BUDGET_S,
    MackerelSettings,
    PassBudget,
    export_mackerel,
    write_prometheus,
)
from jobs.monitoring.mackerel import MackerelError
from jobs.runtime.context import JobContext
from jobs.runtime.locks import key_lock
from jobs.runtime.logconfig import configure_logging
from metering.errors import ConfigError
from metering.settings import Settings

NOW = datetime.now(UTC).replace(microsecond=0)
KEY = "mkr-secret-key-123"


def _log(tmp_path: Path, *runs: tuple[str, str, str, datetime]) -> Path:
    path = tmp_path / "logs" / "hostmeter.jsonl"
    path.parent.mkdir(exist_ok=True)
    with path.open("a") as f:
        for run_id, job, status, at in runs:
            f.write(json.dumps({"event": "job_finished", "timestamp": at.isoformat(),
                                "job": job, "run_id": run_id, "status": status,
                                "duration_s": 1.25, "tenants_expected": 2,
                                "tenants_processed": 2}) + "\n")
    return path.parent


class Recorder:
    def __init__(self, fail_with: int | None = None) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.fail_with = fail_with

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if self.fail_with and request.url.path.endswith("/tsdb"):
            return httpx.Response(self.fail_with, text="nope")
        self.posts.append((request.url.path, body))
        return httpx.Response(200, json={"success": True})

    def tsdb(self) -> list[dict[str, Any]]:
        return [p for path, body in self.posts if path.endswith("/tsdb") for p in body]

    def held(self) -> dict[str, dict[int, float]]:
        """What Mackerel would hold: the last value posted per (name, time)."""
        out: dict[str, dict[int, float]] = {}
        for p in self.tsdb():
            out.setdefault(p["name"], {})[p["time"]] = p["value"]
        return out


def test_mackerel_export_is_checkpointed(engine: Engine, tmp_path: Path) -> None:
    logs = _log(tmp_path, ("a", "snapshot-usage", "succeeded", NOW - timedelta(minutes=20)),
                ("b", "snapshot-usage", "failed", NOW - timedelta(minutes=3)))
    lm.aggregate(engine, [logs], now=NOW)
    settings = MackerelSettings(api_key=KEY, base_url="http://mackerel.test")
    rec = Recorder()
    client = httpx.Client(transport=httpx.MockTransport(rec))
    first = export_mackerel(engine, settings, now=NOW, client=client)
    names = {p["name"] for p in rec.tsdb()}
    assert "hostmeter.job.runs.snapshot-usage.failed" in names
    assert first["mackerel_sent"] == len(rec.tsdb()) > 0
    assert [path for path, _ in rec.posts].count("/api/v0/graph-defs/create") == 1

    # Aggregating and exporting again posts nothing new (and no graph definitions again).
    lm.aggregate(engine, [logs], now=NOW)
    before = len(rec.posts)
    again = export_mackerel(engine, settings, now=NOW, client=client)
    assert again["mackerel_sent"] == 0 and len(rec.posts) == before

    # A new run is exported alone.
    _log(tmp_path, ("c", "close-billing-period", "succeeded", NOW + timedelta(minutes=6)))
    lm.aggregate(engine, [logs], now=NOW + timedelta(minutes=7))
    third = export_mackerel(engine, settings, now=NOW + timedelta(minutes=7), client=client)
    assert third["mackerel_sent"] > 0
    assert {p["name"].split(".")[3] for p in rec.tsdb()[-third["mackerel_sent"]:]} == {
        "close-billing-period"}


def test_a_failed_export_loses_nothing_and_never_logs_the_key(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOSTMETER_AGGREGATE_BUDGET_S", "2")  # the retries give up within 2 s
    logs = _log(tmp_path, ("a", "snapshot-usage", "succeeded", NOW - timedelta(minutes=20)))
    lm.aggregate(engine, [logs], now=NOW)
    stream = io.StringIO()
    log_file = configure_logging(str(tmp_path / "out"), stream=stream)
    settings = MackerelSettings(api_key=KEY, base_url="http://mackerel.test")
    down = httpx.Client(transport=httpx.MockTransport(Recorder(fail_with=503)))
    import jobs.monitoring.mackerel as mk

    with pytest.raises(MackerelError) as info:
        export_mackerel(engine, settings, now=NOW, client=down)
    assert KEY not in str(info.value) and KEY not in repr(settings)
    rec = Recorder()
    up = httpx.Client(transport=httpx.MockTransport(rec))
    sent = export_mackerel(engine, settings, now=NOW, client=up)["mackerel_sent"]
    assert sent == len(rec.tsdb()) > 0  # everything that failed is delivered now
    assert log_file is not None
    assert KEY not in log_file.read_text() + stream.getvalue()
    configure_logging(None, stream=io.StringIO())
    assert timedelta(hours=24) == mk.MAX_AGE


def test_prometheus_textfile_from_the_store(engine: Engine, tmp_path: Path) -> None:
    logs = _log(tmp_path, ("a", "snapshot-usage", "succeeded", NOW - timedelta(minutes=20)))
    lm.aggregate(engine, [logs], now=NOW)
    path = tmp_path / "hostmeter.prom"
    write_prometheus(engine, Settings().zone, path)
    families = {f.name: f for f in text_string_to_metric_families(path.read_text())}
    [sample] = [s for s in families["hostmeter_job_tenants_processed"].samples]
    assert sample.labels == {"job": "snapshot-usage"} and sample.value == 2


@pytest.mark.slow
def test_demo_then_metrics_then_dashboard_as_a_user(db_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "HOSTMETER_DATABASE_URL": db_url,
           "HOSTMETER_LOG_DIR": str(tmp_path / "logs")}

    def hm(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc

    hm("demo", "--tenants", "12", "--period", "2026-10")
    first = json.loads(hm("metrics", "aggregate", "--format", "json").stdout)
    # snapshot + close, then the current month: snapshot, estimate-usage, deliver-webhooks
    assert first["runs"] == 5 and first["malformed_lines"] == 0
    second = json.loads(hm("metrics", "aggregate", "--format", "json").stdout)
    assert second["runs"] == 1  # only the first aggregation's own job_finished is new
    hm("dashboard", "--out", "d.html")
    page = (tmp_path / "d.html").read_text()
    assert "close-billing-period" in page and "2026-10" in page and "https://" not in page


# --- exact under failures: changed and late buckets, late writes, the pass budget ----------

T0 = datetime(2026, 11, 1, 12, 2, tzinfo=UTC)


def _run(run_id: str, at: datetime, *, job: str = "snapshot-usage", status: str = "succeeded",
         **counts: int) -> str:
    return json.dumps({"event": "job_finished", "timestamp": at.isoformat(), "job": job,
                       "run_id": run_id, "status": status, "duration_s": 1.25,
                       "tenants_expected": 2, "tenants_processed": 2, **counts}) + "\n"


def _bucket(at: datetime) -> int:
    """The epoch second of the 5-minute bucket ``at`` falls in."""
    return int(at.timestamp()) // 300 * 300


def _append(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.writelines(lines)
    return path


@pytest.fixture
def mackerel() -> Iterator[MackerelStandIn]:
    with MackerelStandIn(KEY, late_s=1.0) as stand_in:
        yield stand_in


def test_a_second_run_in_an_exported_bucket_is_sent_again(engine: Engine,
                                                          tmp_path: Path) -> None:
    log = _append(tmp_path / "logs" / "hostmeter.jsonl", _run("a", T0 - timedelta(minutes=20)))
    lm.aggregate(engine, [log], now=T0)
    settings = MackerelSettings(api_key=KEY, base_url="http://mackerel.test")
    rec = Recorder()
    client = httpx.Client(transport=httpx.MockTransport(rec))
    export_mackerel(engine, settings, now=T0, client=client)
    assert rec.held() == store_state(engine, T0)

    # A second job_finished lands in the same, already exported, 5-minute bucket.
    _append(log, _run("b", T0 - timedelta(minutes=19)))
    later = T0 + timedelta(minutes=5)
    lm.aggregate(engine, [log], now=later)
    before = len(rec.tsdb())
    export_mackerel(engine, settings, now=later, client=client)
    resent = {p["name"] for p in rec.tsdb()[before:]}
    assert rec.held() == store_state(engine, later)
    bucket = _bucket(T0 - timedelta(minutes=20))
    assert rec.held()["hostmeter.job.runs.snapshot-usage.succeeded"][bucket] == 2.0
    # only the points whose value changed are sent again (the duration's max did not change)
    assert resent == {"hostmeter.job.runs.snapshot-usage.succeeded",
                      "hostmeter.job.tenants_expected.snapshot-usage",
                      "hostmeter.job.tenants_processed.snapshot-usage"}


def test_a_late_log_file_with_old_buckets_is_sent(engine: Engine, tmp_path: Path,
                                                  mackerel: MackerelStandIn) -> None:
    logs = tmp_path / "logs"
    _append(logs / "hostmeter.jsonl", _run("a", T0 - timedelta(minutes=10)))
    lm.aggregate(engine, [logs], now=T0)
    settings = MackerelSettings(api_key=KEY, base_url=mackerel.base_url)
    export_mackerel(engine, settings, now=T0)

    # A log file from another host arrives late: a run 3 hours ago (Mackerel still takes
    # it) and one 30 hours ago (Mackerel refuses points older than a day).
    _append(logs / "other-host.jsonl", _run("b", T0 - timedelta(hours=3), job="prune-usage"),
            _run("c", T0 - timedelta(hours=30), job="prune-usage"))
    later = T0 + timedelta(minutes=5)
    lm.aggregate(engine, [logs], now=later)
    with capture_logs() as events:
        export_mackerel(engine, settings, now=later)

    held = mackerel.state()
    assert held == store_state(engine, later)
    three_hours = _bucket(T0 - timedelta(hours=3))
    assert held["hostmeter.job.runs.prune-usage.succeeded"] == {three_hours: 1.0}
    (too_old,) = [e for e in events if e["event"] == "mackerel_points_too_old"]
    assert too_old["count"] > 0


def test_a_request_that_lands_after_its_timeout_leaves_no_stale_value(
    engine: Engine, tmp_path: Path, mackerel: MackerelStandIn, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOSTMETER_AGGREGATE_BUDGET_S", "3")
    log = _append(tmp_path / "logs" / "hostmeter.jsonl", _run("a", T0 - timedelta(minutes=1)))
    lm.aggregate(engine, [log], now=T0)
    settings = MackerelSettings(api_key=KEY, base_url=mackerel.base_url)
    client = httpx.Client(timeout=0.5)

    # Pass 1: Mackerel takes the request but does not answer in time; it is still in flight.
    mackerel.always(Fault.hang(lands=True))
    with pytest.raises(MackerelError):
        export_mackerel(engine, settings, now=T0, client=client)
    mackerel.always(None)

    # Pass 2: a second run changes the bucket; the new values are posted and accepted...
    _append(log, _run("b", T0 - timedelta(minutes=1) + timedelta(seconds=30)))
    at = T0 + timedelta(minutes=5)
    lm.aggregate(engine, [log], now=at)
    export_mackerel(engine, settings, now=at, client=client)
    assert mackerel.state() == store_state(engine, at)
    # ...and then the request of pass 1 lands, with the old values.
    assert mackerel.release() > 0
    assert mackerel.state() != store_state(engine, at)

    # Later passes put the store's values back once that request can no longer land.
    for minutes in (10, 16, 21):
        at = T0 + timedelta(minutes=minutes)
        export_mackerel(engine, settings, now=at, client=client)
    assert mackerel.state() == store_state(engine, at)


def _timed_pass(engine: Engine, logs: Path, at: datetime, limit_s: float
                ) -> tuple[float | None, BaseException | None]:
    """Run one aggregate-job-logs pass in a thread: (seconds it took or None, its error)."""
    ctx = JobContext(engine=engine, settings=Settings(), clock=lambda: at)
    outcome: dict[str, Any] = {}

    def body() -> None:
        start = time.monotonic()
        try:
            aggregate_job_logs.run(ctx, at, logs=[str(logs)], exports=["mackerel"])
        except BaseException as exc:
            outcome["error"] = exc
        outcome["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout=limit_s)
    return outcome.get("elapsed"), outcome.get("error")


@pytest.mark.parametrize("fault", [
    Fault.refuse(429, retry_after="120"), Fault.refuse(503), Fault.hang(), Fault.late(),
], ids=["429-retry-after-120", "503", "hang", "late-answer"])  # fmt: skip
def test_a_pass_ends_within_its_budget(engine: Engine, tmp_path: Path,
                                       mackerel: MackerelStandIn, fault: Fault,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    budget = 2.0
    monkeypatch.setenv("HOSTMETER_AGGREGATE_BUDGET_S", str(budget))
    monkeypatch.setenv("MACKEREL_API_KEY", KEY)
    monkeypatch.setenv("MACKEREL_API_BASE", mackerel.base_url)
    mackerel.late_s = 15.0  # far past the pass
    logs = _append(tmp_path / "logs" / "hostmeter.jsonl",
                   *(_run(f"r{i}", T0 - timedelta(minutes=5 * i)) for i in range(40))).parent
    mackerel.always(fault)
    elapsed, error = _timed_pass(engine, logs, T0, limit_s=budget + 5)
    assert elapsed is not None and elapsed < budget + 1.0, elapsed
    assert isinstance(error, MackerelError)  # what was not delivered is left for next time

    mackerel.always(None)
    mackerel.release()
    later = T0 + timedelta(minutes=5)
    elapsed, error = _timed_pass(engine, logs, later, limit_s=budget + 5)
    assert error is None and elapsed is not None and elapsed < budget + 1.0
    assert mackerel.state() == store_state(engine, later)


def test_a_retry_after_longer_than_the_pass_is_honoured_by_the_next_passes(
    engine: Engine, tmp_path: Path, mackerel: MackerelStandIn, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOSTMETER_AGGREGATE_BUDGET_S", "2")
    log = _append(tmp_path / "logs" / "hostmeter.jsonl", _run("a", T0 - timedelta(minutes=1)))
    lm.aggregate(engine, [log], now=T0)
    settings = MackerelSettings(api_key=KEY, base_url=mackerel.base_url)
    mackerel.then(Fault.refuse(429, retry_after="300"))
    with pytest.raises(MackerelError) as info:
        export_mackerel(engine, settings, now=T0)
    assert info.value.retry_at is not None
    assert T0 + timedelta(seconds=300) <= info.value.retry_at < T0 + timedelta(seconds=305)

    with pytest.raises(MackerelError, match="not to be called before"):
        export_mackerel(engine, settings, now=T0 + timedelta(minutes=2))
    assert len(mackerel.tsdb_requests()) == 1  # the pass before retry_at left Mackerel alone

    at = T0 + timedelta(minutes=6)
    assert export_mackerel(engine, settings, now=at)["mackerel_sent"] == 4
    assert mackerel.state() == store_state(engine, at)


def test_a_second_exporter_leaves_the_delivery_to_the_one_running(
    engine: Engine, tmp_path: Path, mackerel: MackerelStandIn,
) -> None:
    log = _append(tmp_path / "logs" / "hostmeter.jsonl", _run("a", T0 - timedelta(minutes=1)))
    lm.aggregate(engine, [log], now=T0)
    settings = MackerelSettings(api_key=KEY, base_url=mackerel.base_url)
    with key_lock(engine, "export:mackerel") as held:
        assert held
        busy = export_mackerel(engine, settings, now=T0)
    assert busy == {"mackerel_sent": 0, "mackerel_busy": True} and mackerel.requests == []
    assert export_mackerel(engine, settings, now=T0)["mackerel_sent"] == 4


@pytest.mark.parametrize(("raw", "seconds"), [(None, DEFAULT_BUDGET_S), ("", DEFAULT_BUDGET_S),
                                              ("45", 45.0), ("2.5", 2.5)])
def test_the_pass_budget_setting(raw: str | None, seconds: float) -> None:
    env = {} if raw is None else {"HOSTMETER_AGGREGATE_BUDGET_S": raw}
    assert PassBudget.from_env(env).seconds == seconds
    assert DEFAULT_BUDGET_S < 300  # a pass ends well inside the 5-minute schedule


@pytest.mark.parametrize("raw", ["0", "-3", "soon", "nan", "inf"])
def test_a_bad_pass_budget_is_one_clear_error(raw: str) -> None:
    with pytest.raises(ConfigError, match="HOSTMETER_AGGREGATE_BUDGET_S") as info:
        PassBudget.from_env({"HOSTMETER_AGGREGATE_BUDGET_S": raw})
    assert "\n" not in str(info.value)


# --- tenants: fleet totals and bounded per-tenant gauges, built through the log pass ----------

J = datetime(2026, 11, 2, 0, 0, tzinfo=UTC)
"""The hour the noisy tenants jump in; 24 steady hours before it."""
AT = J + timedelta(hours=1, minutes=10)
"""Just after J is snapshotted (its lines are logged at J + 1h05): J is the snapshot hour."""
HOSTILE = 'evil"} 1\nhostmeter_fleet_hosts 9e9 # \\ é'
"""A tenant key that would forge a sample if label values were not escaped."""


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _tenant_hour(tenant: str, hour: datetime, hosts: int, metrics: int, *,
                 logged: datetime | None = None) -> str:
    logged = logged or hour + timedelta(hours=1, minutes=5)
    return json.dumps({"event": "tenant_hour", "level": "info", "timestamp": _iso(logged),
                       "job": "snapshot-usage", "run_id": "r", "logical_time": _iso(logged),
                       "tenant": tenant, "hour": _iso(hour), "std": hosts, "micro": 0,
                       "metrics": metrics, "over": 0, "svc": 0, "mon": 0,
                       "plan": "standard"}) + "\n"


def _ingested(tenant: str, at: datetime, posts: int) -> str:
    return json.dumps({"event": "tenant_ingested", "level": "info", "timestamp": _iso(at),
                       "job": "ingest", "run_id": "i", "tenant": tenant, "posts": posts,
                       "records": posts}) + "\n"


# tenant -> (hosts, metrics) for the 24 steady hours, then in J
FLEET: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "big-a": ((500, 50_000), (500, 50_000)),
    HOSTILE: ((450, 45_000), (450, 45_000)),
    "big-b": ((400, 40_000), (400, 40_000)),
    "mid": ((300, 1_000), (300, 1_000)),  # 4th by hosts: not shown with N = 3
    "noisy-6x": ((10, 100), (60, 100)),  # hosts x6
    "noisy-5x": ((10, 1_000), (10, 5_000)),  # metrics x5
    "noisy-4x": ((10, 100), (40, 100)),  # hosts x4
    "noisy-3.1x": ((10, 100), (31, 100)),  # hosts x3.1: the 4th flagged, not shown with N = 3
    **{f"small-{i}": ((12 + i, 200), (12 + i, 200)) for i in range(6)},
}
# tenant -> posts ingested in J (the hour after is still filling up)
POSTS = {"chatty": 10_000, "big-a": 5_000, "big-b": 3_000, "mid": 1_000, "noisy-6x": 50}


def _fleet_logs(tmp_path: Path) -> Path:
    lines = []
    for tenant, ((hosts, metrics), jump) in FLEET.items():
        lines += [_tenant_hour(tenant, J - timedelta(hours=h), hosts, metrics)
                  for h in range(24, 0, -1)]
        lines.append(_tenant_hour(tenant, J, *jump))
    lines += [_ingested(tenant, J + timedelta(minutes=10), n) for tenant, n in POSTS.items()]
    lines.append(_ingested("chatty", J + timedelta(hours=1, minutes=2), 99_999))  # current hour
    return _append(tmp_path / "logs" / "hostmeter.jsonl", *lines)


def _tenant_samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """hostmeter_fleet_* / hostmeter_tenant* sample name -> {sorted labels: value}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(("hostmeter_fleet_", "hostmeter_tenant")):
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _tenants(samples: dict[tuple[tuple[str, str], ...], float]) -> dict[str, float]:
    return {dict(labels)["tenant"]: value for labels, value in samples.items()}


def _sums(engine: Engine, hour: datetime) -> dict[str, int]:
    import sqlalchemy as sa

    from jobs.monitoring.store import tenant_series as s

    with engine.connect() as conn:
        return {series: int(total) for series, total in conn.execute(
            sa.select(s.c.series, sa.func.sum(s.c.value)).where(s.c.hour == hour)
            .group_by(s.c.series))}


def test_prometheus_shows_the_fleet_and_only_the_top_n_and_the_noisiest_tenants(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOSTMETER_EXPORT_TOP_TENANTS", "3")
    lm.aggregate(engine, [_fleet_logs(tmp_path)], now=AT)
    path = tmp_path / "hostmeter.prom"
    write_prometheus(engine, Settings().zone, path, now=AT)
    text = path.read_text()
    got = _tenant_samples(text)

    # fleet totals: every tenant of the hour, whatever is shown per tenant
    sums = _sums(engine, J)
    assert sums["hosts"] == sum(jump[0] for _, jump in FLEET.values())
    assert sums["posts"] == sum(POSTS.values())  # the 99,999 of the current hour are not in
    assert got["hostmeter_fleet_hosts"] == {(): sums["hosts"]}
    assert got["hostmeter_fleet_metrics"] == {(): sums["metrics"]}
    assert got["hostmeter_fleet_posts"] == {(): sums["posts"]}
    assert got["hostmeter_tenants_noisy"] == {(): 4}  # every flagged tenant is counted

    # per tenant: the top 3 of each series plus the 3 noisiest flagged, nothing else
    shown_noisy = {"noisy-6x", "noisy-5x", "noisy-4x"}
    hosts = _tenants(got["hostmeter_tenant_hosts"])
    assert set(hosts) == {"big-a", HOSTILE, "big-b"} | shown_noisy
    assert hosts == {t: FLEET[t][1][0] for t in hosts}
    metrics = _tenants(got["hostmeter_tenant_metrics"])
    assert metrics == {t: FLEET[t][1][1] for t in {"big-a", HOSTILE, "big-b"} | shown_noisy}
    # posts: a flagged tenant without posts in the hour has no posts series (not a made-up 0)
    assert _tenants(got["hostmeter_tenant_posts"]) == {
        "chatty": 10_000, "big-a": 5_000, "big-b": 3_000, "noisy-6x": 50}
    assert set(got["hostmeter_tenant_noisy"]) == {
        (("series", "hosts"), ("tenant", "noisy-6x")),
        (("series", "metrics"), ("tenant", "noisy-5x")),
        (("series", "hosts"), ("tenant", "noisy-4x"))}
    assert set(got["hostmeter_tenant_noisy"].values()) == {1.0}
    assert "mid" not in text and "noisy-3.1x" not in text and "small-" not in text

    # the hostile key is one escaped label value, parsed back as it was; it forged no sample
    lines = text.splitlines()
    escaped = r'evil\"} 1\nhostmeter_fleet_hosts 9e9 # \\ é'
    assert f'hostmeter_tenant_hosts{{tenant="{escaped}"}} 450.0' in lines
    assert [ln for ln in lines if ln.startswith("hostmeter_fleet_hosts")] == [
        f"hostmeter_fleet_hosts {float(sums['hosts'])}"]


def test_the_cardinality_bound_holds_whatever_n(engine: Engine, tmp_path: Path) -> None:
    from jobs.monitoring.exports import prometheus_registry
    from jobs.monitoring.prometheus import exposition

    lm.aggregate(engine, [_fleet_logs(tmp_path)], now=AT)
    for top in (1, 2, 3, 5, 10, 1000):
        got = _tenant_samples(exposition(
            prometheus_registry(engine, Settings().zone, now=AT, top=top)).decode())
        noisy = {dict(labels)["tenant"] for labels in got["hostmeter_tenant_noisy"]}
        assert len(noisy) == min(top, 4)
        assert len(got["hostmeter_tenant_noisy"]) <= 2 * top
        for series in ("hosts", "metrics", "posts"):
            shown = set(_tenants(got[f"hostmeter_tenant_{series}"]))
            assert len(shown) <= 2 * top
            assert shown <= set(FLEET) | set(POSTS)
        assert got["hostmeter_tenants_noisy"] == {(): 4}


def test_flags_and_values_of_a_stale_hour_are_not_exported(engine: Engine,
                                                           tmp_path: Path) -> None:
    """Snapshots stopped a day ago: no gauge pretends to be current, no alert stays on."""
    from jobs.monitoring.exports import prometheus_registry
    from jobs.monitoring.prometheus import exposition

    lm.aggregate(engine, [_fleet_logs(tmp_path)], now=AT)
    later = J + timedelta(hours=26, minutes=10)  # J and J + 1h (posts) both over a day old
    got = _tenant_samples(exposition(
        prometheus_registry(engine, Settings().zone, now=later, top=3)).decode())
    assert got == {}
    # an hour later than J but within the day: J is still the latest, and shown
    got = _tenant_samples(exposition(
        prometheus_registry(engine, Settings().zone, now=J + timedelta(hours=5), top=3)).decode())
    assert got["hostmeter_tenants_noisy"] == {(): 4}


@pytest.mark.parametrize(("raw", "top"), [(None, 10), ("", 10), ("3", 3), (" 25 ", 25),
                                          ("1000", 1000)])
def test_the_top_tenants_setting(raw: str | None, top: int) -> None:
    from jobs.monitoring.exports import top_tenants_from_env

    env = {} if raw is None else {"HOSTMETER_EXPORT_TOP_TENANTS": raw}
    assert top_tenants_from_env(env) == top


@pytest.mark.parametrize("raw", ["0", "-1", "1001", "ten", "2.5", "1e3", "3\nx" * 50])
def test_a_bad_top_tenants_setting_is_one_clear_error(raw: str) -> None:
    from jobs.monitoring.exports import top_tenants_from_env

    with pytest.raises(ConfigError, match="HOSTMETER_EXPORT_TOP_TENANTS") as info:
        top_tenants_from_env({"HOSTMETER_EXPORT_TOP_TENANTS": raw})
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


def test_metrics_serve_refuses_a_bad_top_tenants_setting_at_start(tmp_path: Path) -> None:
    env = {**os.environ, "HOSTMETER_EXPORT_TOP_TENANTS": "all",
           "HOSTMETER_DATABASE_URL": f"sqlite:///{tmp_path / 'hm.db'}",
           "HOSTMETER_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "metrics", "serve", "--port", "1"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("{")]
    assert errors == ["hostmeter: error: HOSTMETER_EXPORT_TOP_TENANTS must be a whole number "
                      "from 1 to 1000, not 'all'"]


_MACKEREL_NAME = re.compile(r"[a-zA-Z0-9._-]+")


def test_fleet_totals_reach_mackerel_once_and_a_resnapshot_only_its_point(
    engine: Engine, tmp_path: Path, mackerel: MackerelStandIn,
) -> None:
    log = _fleet_logs(tmp_path)
    lm.aggregate(engine, [log], now=AT)
    settings = MackerelSettings(api_key=KEY, base_url=mackerel.base_url)
    export_mackerel(engine, settings, now=AT)

    stored = mackerel.stored()
    names = {p["name"] for p in stored}
    assert names == {"hostmeter.fleet.hosts", "hostmeter.fleet.metrics",
                     "hostmeter.fleet.posts", "hostmeter.tenants.noisy"}
    assert all(_MACKEREL_NAME.fullmatch(n) for n in names)  # no tenant text in any name
    keys = [(p["name"], p["time"]) for p in stored]
    assert len(keys) == len(set(keys))  # each point once
    held = mackerel.state()
    assert held == store_state(engine, AT)
    hour = int(J.timestamp())
    sums = _sums(engine, J)
    assert held["hostmeter.fleet.hosts"][hour] == sums["hosts"]
    assert held["hostmeter.fleet.metrics"][hour] == sums["metrics"]
    assert held["hostmeter.fleet.posts"] == {hour: sums["posts"], hour + 3600: 99_999}
    assert held["hostmeter.tenants.noisy"][hour] == 4
    # the hours past Mackerel's day were not sent (recorded too_old, not retried)
    assert min(p["time"] for p in stored) >= int((AT - timedelta(hours=24)).timestamp())

    # nothing new: nothing sent
    requests = len(mackerel.tsdb_requests())
    lm.aggregate(engine, [log], now=AT)
    assert export_mackerel(engine, settings, now=AT)["mackerel_sent"] == 0
    assert len(mackerel.tsdb_requests()) == requests

    # a look-back re-snapshot of J changes one tenant's hosts: only that hour's total again
    later = AT + timedelta(minutes=5)
    _append(log, _tenant_hour("big-a", J, 520, 50_000, logged=AT + timedelta(minutes=3)))
    lm.aggregate(engine, [log], now=later)
    export_mackerel(engine, settings, now=later)
    again = mackerel.stored()[len(stored):]
    assert again == [{"name": "hostmeter.fleet.hosts", "time": hour,
                      "value": float(sums["hosts"] + 20)}]
    assert mackerel.state() == store_state(engine, later)
