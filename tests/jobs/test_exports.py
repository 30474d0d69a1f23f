"""The metrics pipeline end to end: job logs → store → Mackerel (checkpointed) / Prometheus /
dashboard, on both backends."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from jobs.monitoring import logmetrics as lm
from jobs.monitoring.exports import MackerelSettings, export_mackerel, write_prometheus
from jobs.monitoring.mackerel import MackerelError
from jobs.runtime.logconfig import configure_logging
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


def test_a_failed_export_loses_nothing_and_never_logs_the_key(engine: Engine,
                                                              tmp_path: Path) -> None:
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
