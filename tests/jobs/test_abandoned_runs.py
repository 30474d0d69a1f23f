"""A run killed mid-way is never forgotten: its ``running`` row (process gone, key lock free) is
reaped as failed and retried by ``--retry-failed``, ``hostmeter retry-failed`` and the local
scheduler's retry pass; a live run is never touched; retries stop at ``max_attempts``; a run
past its deadline is overdue. Real processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from jobs import registry
from jobs.runtime.ledger import job_runs
from jobs.triggers.runner import (
    RunRequest,
    execute,
    failed_keys,
    list_runs,
    lost_triggers,
    overdue_runs,
    reap_abandoned,
    retry_failed,
)
from jobs.triggers.scheduler import RETRY_JOB_ID, LocalScheduler
from metering.db import reading
from metering.ingest import UsageRecorder
from metering.records import HostPost, PlanChange, Record
from metering.settings import Settings
from metering.timeutil import hours_between, month_bounds

ZONE = Settings().zone
PERIOD = "2026-02"
START, END = month_bounds(PERIOD, ZONE)
CLOSE_AT = "2026-03-01T03:00:00+09:00"


def fleet(tenants: int) -> list[Record]:
    recs: list[Record] = []
    for t in range(tenants):
        recs.append(PlanChange(tenant=f"t{t:03d}", plan="standard", at=START))
        recs += [HostPost(tenant=f"t{t:03d}", host="h0", kind="standard",
                          at=h + timedelta(minutes=2), metrics=("cpu",))
                 for h in hours_between(START, END)]
    return recs


def ledger(engine: Engine) -> list[dict[str, Any]]:
    return list(reversed(list_runs(engine)))


def running(engine: Engine) -> int:
    with reading(engine) as conn:
        return int(conn.execute(sa.select(sa.func.count()).where(
            job_runs.c.status == "running")).scalar_one())


# A scheduled close whose body blocks until it is killed: the state an ECS task stopped by a
# deploy (or an OOM kill) leaves behind, at a moment the test chooses.
STUCK_CLOSE = textwrap.dedent("""
    import dataclasses, sys, time
    from datetime import datetime
    from jobs import registry
    from jobs.triggers.runner import RunRequest, execute
    from metering.db import create_engine
    from metering.settings import Settings

    def stuck(ctx, logical_time, **options):
        time.sleep(600)
        return {}

    spec = registry.JOBS["close-billing-period"]
    registry.JOBS["close-billing-period"] = dataclasses.replace(spec, body=stuck)
    url = sys.argv[1]
    execute(create_engine(url), Settings(database_url=url),
            RunRequest(job="close-billing-period", trigger="schedule",
                       scheduled_time=datetime.fromisoformat(sys.argv[2])))
""")


def start_stuck_close(db_url: str, engine: Engine) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", STUCK_CLOSE, db_url, CLOSE_AT],
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not running(engine):
        assert proc.poll() is None, "the stuck run exited"
        time.sleep(0.05)
    assert running(engine) == 1, "the run never started"
    return proc


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_a_killed_scheduled_run_is_reaped_and_retried_never_a_live_one(
    engine: Engine, db_url: str
) -> None:
    settings = Settings(database_url=db_url)
    UsageRecorder(engine).record(fleet(3))
    proc = start_stuck_close(db_url, engine)
    try:
        # Alive: it holds its key's lock; nothing may touch it.
        assert reap_abandoned(engine) == 0
        assert failed_keys(engine, "close-billing-period", ZONE) == []
        assert running(engine) == 1
    finally:
        kill(proc)

    # Gone: the next month's trigger is another key, so only a retry pass can finish this one.
    [retry] = failed_keys(engine, "close-billing-period", ZONE)
    assert (retry.trigger, retry.scheduled_time, dict(retry.options)) == (
        "retry", datetime.fromisoformat(CLOSE_AT), {"period": PERIOD})
    [outcome] = retry_failed(engine, settings, catch_up=False)
    assert (outcome.job, outcome.status, outcome.attempt) == ("close-billing-period",
                                                              "succeeded", 2)
    assert outcome.counts["invoices_written"] == 3
    runs = ledger(engine)
    assert [(r["status"], r["trigger"]) for r in runs] == [("failed", "schedule"),
                                                           ("succeeded", "retry")]
    assert runs[0]["error"].startswith("abandoned: process ")
    assert running(engine) == 0
    assert retry_failed(engine, settings, catch_up=False) == []  # done: nothing left


def test_a_run_is_overdue_after_its_deadline(engine: Engine, db_url: str) -> None:
    proc = start_stuck_close(db_url, engine)
    try:
        [row] = [r for r in list_runs(engine) if r["status"] == "running"]
        started = datetime.fromisoformat(row["started_at"])
        bound = registry.JOBS["close-billing-period"].max_runtime
        assert datetime.fromisoformat(row["deadline"]) == started + bound
        assert overdue_runs(engine, started + bound - timedelta(seconds=1)) == []
        [overdue] = overdue_runs(engine, started + bound + timedelta(seconds=1))
        assert overdue["run_id"] == row["run_id"]
    finally:
        kill(proc)


def test_retries_stop_at_max_attempts(engine: Engine, db_url: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(database_url=db_url)

    def broken(ctx: Any, logical_time: datetime, **kw: Any) -> dict[str, Any]:
        raise RuntimeError("catalog bucket unreachable")

    spec = registry.JOBS["snapshot-usage"]
    monkeypatch.setitem(registry.JOBS, "snapshot-usage",
                        registry.JobSpec(**{**{f: getattr(spec, f) for f in spec.__slots__},
                                            "body": broken}))
    at = datetime(2026, 2, 10, 10, 5, tzinfo=UTC)
    assert execute(engine, settings, RunRequest(job="snapshot-usage", scheduled_time=at,
                                                trigger="schedule")).status == "failed"
    def attempts() -> list[int]:
        return [o.attempt for o in retry_failed(engine, settings, max_attempts=3,
                                                catch_up=False)]

    assert attempts() == [2]
    assert attempts() == [3]
    assert attempts() == []  # exhausted: left failed, to alert
    assert len(failed_keys(engine, "snapshot-usage", ZONE)) == 1  # an operator may still retry


def hostmeter(db_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOSTMETER_DATABASE_URL": db_url,
           "HOSTMETER_LOG_DIR": str(tmp_path / "logs")}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_cli_retry_failed_finishes_a_killed_scheduled_close(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    UsageRecorder(engine).record(fleet(3))
    kill(start_stuck_close(db_url, engine))
    stuck = hostmeter(db_url, tmp_path, "runs", "--status", "running", "--format", "json")
    assert [r["status"] for r in json.loads(stuck.stdout)] == ["running"]

    done = hostmeter(db_url, tmp_path, "run", "close-billing-period", "--retry-failed",
                     "--format", "json")
    assert done.returncode == 0, done.stderr
    assert [(o["status"], o["trigger"]) for o in json.loads(done.stdout)] == [
        ("succeeded", "retry")]
    after = hostmeter(db_url, tmp_path, "runs", "--status", "running", "--format", "json")
    assert json.loads(after.stdout) == []


@pytest.mark.slow
def test_retry_failed_command_retries_every_job_within_max_attempts(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    UsageRecorder(engine).record(fleet(2))
    kill(start_stuck_close(db_url, engine))
    done = hostmeter(db_url, tmp_path, "retry-failed", "--max-attempts", "5", "--format", "json")
    assert done.returncode == 0, done.stderr
    outcomes = json.loads(done.stdout)
    assert [(o["job"], o["status"]) for o in outcomes if o["trigger"] == "retry"] == [
        ("close-billing-period", "succeeded")]
    # and, at today's clock, the latest fire time of every job that must be caught up
    assert sorted(o["job"] for o in outcomes if o["trigger"] == "catch-up") == [
        "close-billing-period", "finalize-invoices", "snapshot-usage"]
    again = hostmeter(db_url, tmp_path, "retry-failed", "--max-attempts", "5")
    assert again.returncode == 0 and "nothing to retry" in again.stdout
    only = hostmeter(db_url, tmp_path, "retry-failed", "--no-catch-up", "--format", "json")
    assert only.returncode == 0 and json.loads(only.stdout) == []


def test_a_trigger_lost_before_it_left_a_row_is_caught_up(engine: Engine, db_url: str) -> None:
    settings = Settings(database_url=db_url)
    UsageRecorder(engine).record(fleet(2))
    fired = datetime.fromisoformat(CLOSE_AT)
    # No ledger row: the trigger never arrived, or its task died while starting.
    young = lost_triggers(engine, "close-billing-period", ZONE, fired + timedelta(minutes=5))
    assert fired not in [r.scheduled_time for r in young]  # may still be starting
    [lost] = lost_triggers(engine, "close-billing-period", ZONE, fired + timedelta(hours=1))
    assert (lost.scheduled_time, lost.trigger) == (fired, "catch-up")
    assert lost_triggers(engine, "prune-usage", ZONE, fired + timedelta(days=3)) == []
    [outcome] = retry_failed(engine, settings, jobs=["close-billing-period"],
                             clock=lambda: fired + timedelta(hours=1))
    assert (outcome.status, outcome.trigger, outcome.counts["invoices_written"]) == (
        "succeeded", "catch-up", 2)
    assert lost_triggers(engine, "close-billing-period", ZONE, fired + timedelta(hours=1)) == []


def test_the_local_scheduler_runs_a_retry_pass_on_start_and_on_an_interval() -> None:
    calls: list[str] = []
    far = datetime(2099, 1, 1, tzinfo=UTC)  # no registry job is due: only the retry pass runs
    sched = LocalScheduler({}, fire=lambda *a: None, last_success=lambda name: None,
                           now=lambda: far, retry=lambda: calls.append("retry"),
                           retry_interval=timedelta(minutes=15))
    sched.start()
    try:
        assert calls == ["retry"]
        [job] = [j for j in sched.apscheduler.get_jobs() if j.id == RETRY_JOB_ID]
        assert job.trigger.interval == timedelta(minutes=15)
    finally:
        sched.shutdown()


def test_a_failing_retry_pass_does_not_stop_the_scheduler() -> None:
    def broken() -> None:
        raise RuntimeError("database down")

    sched = LocalScheduler({}, fire=lambda *a: None, last_success=lambda name: None,
                           retry=broken)
    assert sched.retry_pass() is False
    sched.start()
    try:
        assert sched.running
    finally:
        sched.shutdown()


def test_runs_overdue_lists_only_running_rows_past_their_deadline(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(sa.insert(job_runs), [
            dict(run_id=run_id, job="close-billing-period", logical_time=now - timedelta(days=n),
                 scheduled_time=now, shard="0/1", trigger="schedule", attempt=1, status=status,
                 counts={}, host="w", pid=1, started_at=now - timedelta(hours=3),
                 deadline=now + deadline)
            for n, (run_id, status, deadline) in enumerate((
                ("stuck", "running", timedelta(hours=-1)),
                ("young", "running", timedelta(hours=1)),
                ("ended", "failed", timedelta(hours=-1)),
            ))])
    out = hostmeter(db_url, tmp_path, "runs", "--overdue", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert [r["run_id"] for r in json.loads(out.stdout)] == ["stuck"]
