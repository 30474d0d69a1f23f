"""The metrics pipeline end to end: job logs → store → Mackerel (checkpointed) / Prometheus /
dashboard, on both backends."""

from __future__ import annotations

import io
import json
import os
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
    assert first["runs"] == 2 and first["malformed_lines"] == 0  # snapshot + close
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
