"""aggregate-job-logs reading CloudWatch Logs (jobs.monitoring.cloudwatch): each event exactly once
by ingestion time, paging, Lambda's own lines, errors that store nothing — with an injected fake
client and with boto3 against a real HTTP server on 127.0.0.1, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from awsfake import DUMMY_ENV, FakeAws, boto3_client, serve
from sqlalchemy.engine import Engine

from jobs import aggregate_job_logs
from jobs.monitoring import cloudwatch
from jobs.monitoring import logmetrics as lm
from jobs.monitoring.store import job_metrics, log_checkpoints, log_runs
from jobs.runtime.context import JobContext, run_job
from jobs.runtime.errors import AwsError
from metering.settings import Settings

GROUP = "/hostmeter/prod/jobs"
NOW = datetime(2026, 11, 1, 3, 10, tzinfo=UTC)
HOSTMETER = shutil.which("hostmeter", path=str(Path(sys.executable).parent)) or "hostmeter"


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def finished(run_id: str, at: datetime, job: str = "snapshot-usage",
             status: str = "succeeded", **counts: Any) -> str:
    return json.dumps({"event": "job_finished", "level": "info", "timestamp": at.isoformat(),
                       "job": job, "run_id": run_id, "logical_time": at.isoformat(),
                       "status": status, "duration_s": 1.5, "error": None, **counts})


def put(fake: FakeAws, message: str, at: datetime, *, lag: timedelta = timedelta(seconds=3),
        group: str = GROUP) -> None:
    """An event stamped ``at`` and ingested ``lag`` later."""
    fake.put(group, message, timestamp=ms(at), ingested=ms(at + lag))


def run_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(sa.select(log_runs.c.run_id)))


def checkpoint(engine: Engine, group: str = GROUP) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(log_checkpoints).where(
            log_checkpoints.c.path == cloudwatch.checkpoint_key(group))).mappings().one_or_none()
    return dict(row) if row is not None else None


def malformed_total(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(sa.select(sa.func.coalesce(sa.func.sum(job_metrics.c.value), 0))
                               .where(job_metrics.c.name == lm.MALFORMED)))


def test_each_event_is_read_once_by_ingestion_time(engine: Engine) -> None:
    fake = FakeAws()
    put(fake, finished("a", NOW - timedelta(minutes=9)), NOW - timedelta(minutes=9))
    put(fake, "Traceback (most recent call last):", NOW - timedelta(minutes=8))
    # ingested 1 minute ago: inside the settle time, left for the next pass
    put(fake, finished("b", NOW - timedelta(minutes=1)), NOW - timedelta(minutes=1))

    first = lm.aggregate(engine, [], now=NOW, log_groups=[GROUP], logs_client=fake)
    assert (first.log_groups, first.log_events, first.lines, first.runs, first.malformed) == (
        1, 2, 2, 1, 1)
    assert run_ids(engine) == {"a"}
    cp = checkpoint(engine)
    assert cp is not None and cp["offset"] == ms(NOW - cloudwatch.SETTLE)
    assert cp["malformed"] == 1
    assert "startTime" not in fake.calls[0][1]  # a first pass reads all the group retains

    later = NOW + timedelta(minutes=5)
    put(fake, finished("c", later - timedelta(minutes=3)), later - timedelta(minutes=3))
    second = lm.aggregate(engine, [], now=later, log_groups=[GROUP], logs_client=fake)
    assert (second.log_events, second.runs, second.malformed) == (2, 2, 0)
    assert run_ids(engine) == {"a", "b", "c"}
    assert malformed_total(engine) == 1  # the traceback line was not counted again
    # it asked from an hour before the checkpoint, for events stamped before their ingestion
    assert fake.calls[-1][1]["startTime"] == cp["offset"] - ms(
        datetime.fromtimestamp(3600, UTC))

    again = lm.aggregate(engine, [], now=later, log_groups=[GROUP], logs_client=fake)
    assert (again.log_events, again.lines, again.runs) == (0, 0, 0)


def test_an_event_stamped_well_before_its_ingestion_is_still_read(engine: Engine) -> None:
    fake = FakeAws(groups={GROUP: []})
    lm.aggregate(engine, [], now=NOW, log_groups=[GROUP], logs_client=fake)  # checkpoint
    later = NOW + timedelta(minutes=10)
    # a task that could not reach CloudWatch for 40 minutes: stamped before the checkpoint
    put(fake, finished("late", NOW - timedelta(minutes=40)), NOW - timedelta(minutes=40),
        lag=timedelta(minutes=45))
    out = lm.aggregate(engine, [], now=later, log_groups=[GROUP], logs_client=fake)
    assert out.runs == 1 and run_ids(engine) == {"late"}


def test_every_page_is_read(engine: Engine) -> None:
    fake = FakeAws(page_size=2)
    for i in range(5):
        put(fake, finished(f"r{i}", NOW - timedelta(minutes=30 - i)),
            NOW - timedelta(minutes=30 - i))
    out = lm.aggregate(engine, [], now=NOW, log_groups=[GROUP], logs_client=fake)
    assert out.runs == 5 and len(fake.calls) == 3
    assert [c[1].get("nextToken") for c in fake.calls] == [None, "2", "4"]


def test_lambda_platform_lines_are_not_malformed(engine: Engine) -> None:
    fake = FakeAws()
    at = NOW - timedelta(minutes=6)
    for line in ("INIT_START Runtime Version: python:3.11.v40\tRuntime Version ARN: arn:…",
                 "START RequestId: 8f5a Version: $LATEST",
                 finished("lam", at, job="aggregate-job-logs"),
                 "END RequestId: 8f5a",
                 "REPORT RequestId: 8f5a\tDuration: 812.11 ms\tBilled Duration: 813 ms",
                 "[ERROR] Runtime.ImportModuleError: Unable to import module "
                 "'jobs.triggers.aws_lambda'"):
        put(fake, line, at)
    out = lm.aggregate(engine, [], now=NOW, log_groups=[GROUP], logs_client=fake)
    assert (out.log_events, out.lines, out.runs, out.malformed) == (6, 2, 1, 1)


def test_two_groups_and_files_in_one_pass(engine: Engine, tmp_path: Any) -> None:
    fake = FakeAws()
    put(fake, finished("ecs", NOW - timedelta(minutes=7)), NOW - timedelta(minutes=7))
    put(fake, finished("lam", NOW - timedelta(minutes=6), job="aggregate-job-logs"),
        NOW - timedelta(minutes=6), group="/hostmeter/prod/lambda")
    log = tmp_path / "hostmeter.jsonl"
    log.write_text(finished("file", NOW - timedelta(minutes=5)) + "\n")
    out = lm.aggregate(engine, [log], now=NOW, logs_client=fake,
                       log_groups=[GROUP, "/hostmeter/prod/lambda"])
    assert (out.files, out.log_groups, out.runs) == (1, 2, 3)
    assert run_ids(engine) == {"ecs", "lam", "file"}


def test_an_unknown_group_fails_and_stores_nothing(engine: Engine, tmp_path: Any) -> None:
    fake = FakeAws()
    put(fake, finished("a", NOW - timedelta(minutes=9)), NOW - timedelta(minutes=9))
    log = tmp_path / "hostmeter.jsonl"
    log.write_text(finished("file", NOW - timedelta(minutes=5)) + "\n")
    with pytest.raises(AwsError) as caught:
        lm.aggregate(engine, [log], now=NOW, log_groups=[GROUP, "/nope"], logs_client=fake)
    assert str(caught.value) == "CloudWatch Logs: log group '/nope' does not exist"
    assert run_ids(engine) == set() and checkpoint(engine) is None


def test_a_batch_read_while_another_pass_stored_it_is_dropped(engine: Engine) -> None:
    fake = FakeAws()
    put(fake, "not json", NOW - timedelta(minutes=9))
    put(fake, finished("a", NOW - timedelta(minutes=9)), NOW - timedelta(minutes=9))
    stale = cloudwatch.read_log_group(fake, GROUP, since=None, now=NOW)
    lm.aggregate(engine, [], now=NOW, log_groups=[GROUP], logs_client=fake)  # the other pass
    with engine.begin() as conn:
        assert lm.store_log_group(conn, stale, now=NOW) is None
    assert checkpoint(engine)["malformed"] == 1  # type: ignore[index]


def test_log_groups_from_env() -> None:
    env = {"HOSTMETER_LOG_GROUPS": " /a/jobs, ,/a/lambda "}
    assert cloudwatch.log_groups_from_env(env) == ["/a/jobs", "/a/lambda"]
    assert cloudwatch.log_groups_from_env({}) == []


def test_without_boto3_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 → ImportError
    with pytest.raises(AwsError, match=r"needs boto3: pip install 'hostmeter\[aws\]'"):
        cloudwatch.logs_client()


# --- boto3 against a real HTTP server ----------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in DUMMY_ENV.items():
        monkeypatch.setenv(name, value)


def test_boto3_pages_through_a_real_server(engine: Engine) -> None:
    fake = FakeAws(page_size=2)
    for i in range(3):
        put(fake, finished(f"r{i}", NOW - timedelta(minutes=20 - i)),
            NOW - timedelta(minutes=20 - i))
    with serve(fake) as url:
        client = boto3_client("logs", url)
        out = lm.aggregate(engine, [], now=NOW, log_groups=[GROUP], logs_client=client)
        assert out.runs == 3 and len(fake.calls) == 2
        with pytest.raises(AwsError, match="log group '/nope' does not exist"):
            lm.aggregate(engine, [], now=NOW, log_groups=["/nope"], logs_client=client)


def test_the_job_reads_the_groups_of_its_environment(engine: Engine, aws_env: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeAws()
    put(fake, finished("ecs", NOW - timedelta(minutes=8)), NOW - timedelta(minutes=8))
    with serve(fake) as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL_CLOUDWATCH_LOGS", url)  # boto3's own endpoint setting
        monkeypatch.setenv("HOSTMETER_LOG_GROUPS", GROUP)
        ctx = JobContext(engine=engine, settings=Settings.from_env(), clock=lambda: NOW)
        result = run_job("aggregate-job-logs", aggregate_job_logs.run, ctx, NOW)
    assert result.ok, result.error
    assert result.counts["log_groups"] == 1 and result.counts["runs"] == 1
    assert result.counts["files"] == 0  # HOSTMETER_LOG_DIR is not read when groups are given
    assert run_ids(engine) == {"ecs"}


def test_cli_reads_a_group_and_an_unreachable_endpoint_is_one_line(
        db_url: str, aws_env: None, tmp_path: Path) -> None:
    fake = FakeAws()
    at = datetime.now(UTC) - timedelta(minutes=30)
    put(fake, finished("ecs", at), at)

    def hostmeter(*args: str, endpoint: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTMETER_")}
        env |= {"HOSTMETER_DATABASE_URL": db_url, "HOSTMETER_LOG_DIR": str(tmp_path / "logs"),
                "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": endpoint}
        return subprocess.run([HOSTMETER, "metrics", "aggregate", *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    def error_line(proc: subprocess.CompletedProcess[str]) -> str:
        return [ln for ln in proc.stderr.splitlines() if ln.startswith("hostmeter: error")][-1]

    with serve(fake) as url:
        ok = hostmeter("--log-group", GROUP, "--format", "json", endpoint=url)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout.strip().splitlines()[-1])["runs"] == 1
        unknown = hostmeter("--log-group", "/nope", endpoint=url)
    assert unknown.returncode == 1
    assert error_line(unknown) == ("hostmeter: error: aggregate-job-logs failed: AwsError: "
                                   "CloudWatch Logs: log group '/nope' does not exist")

    down = hostmeter("--log-group", GROUP, endpoint=url)  # the server is gone now
    assert down.returncode == 1
    assert error_line(down).startswith("hostmeter: error: aggregate-job-logs failed: AwsError: "
                                       f"CloudWatch Logs {GROUP}: EndpointConnectionError")
    assert run_ids_at(db_url) == {"ecs"}  # what the first pass stored is still there


def run_ids_at(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return run_ids(engine)
    finally:
        engine.dispose()
