"""The runner and its ledger with real processes: duplicate and concurrent triggers, SIGKILL,
partial runs and shards — on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billing import models as bm
from billing.catalog import Catalog
from billing.rules import MonthSums, Rating, rate
from jobs import billing_jobs
from jobs.runtime.errors import BadTrigger
from jobs.runtime.ledger import job_runs
from jobs.triggers.runner import (
    RunRequest,
    Shard,
    execute,
    failed_keys,
    last_success,
    list_runs,
    parse_shard,
)
from metering import models as m
from metering.db import reading
from metering.ingest import UsageRecorder
from metering.records import HostPost, PlanChange, Record
from metering.settings import Settings
from metering.timeutil import hours_between, month_bounds

ZONE = Settings().zone
PERIOD = "2026-02"
START, END = month_bounds(PERIOD, ZONE)
CLOSE_AT = "2026-03-01T03:00:00+09:00"


def fleet(tenants: int, hosts: int = 2) -> list[Record]:
    recs: list[Record] = []
    for t in range(tenants):
        key = f"t{t:03d}"
        recs.append(PlanChange(tenant=key, plan="standard", at=START))
        for h in hours_between(START, END):
            for i in range(hosts):
                recs.append(HostPost(tenant=key, host=f"h{i}", kind="standard",
                                     at=h + timedelta(minutes=2), metrics=("cpu", "mem")))
    return recs


def hostmeter(db_url: str, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "HOSTMETER_DATABASE_URL": db_url,
           "HOSTMETER_LOG_DIR": str(tmp_path / "logs")}
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def content(engine: Engine) -> dict[str, Any]:
    """Billing data without run ids and wall-clock stamps."""
    with engine.connect() as conn:
        snaps = sorted(map(tuple, conn.execute(sa.select(m.usage_snapshots)).all()))
        inv = bm.invoices
        invoices = sorted(map(tuple, conn.execute(sa.select(
            inv.c.tenant_id, inv.c.revision, inv.c.status, inv.c.total,
            inv.c.content_hash)).all()))
        covered = conn.execute(sa.select(sa.func.count()).select_from(m.snapshot_hours)
                               ).scalar_one()
    return {"snapshots": snaps, "invoices": invoices, "covered": covered}


def ledger(engine: Engine) -> list[dict[str, Any]]:
    return list(reversed(list_runs(engine)))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("job", "at", "hours"),
    [("snapshot-usage", "2026-02-10T10:05:00Z", 4),
     ("close-billing-period", CLOSE_AT, 672)],
)
def test_three_simultaneous_triggers_do_the_work_once(
    db_url: str, engine: Engine, tmp_path: Path, job: str, at: str, hours: int
) -> None:
    UsageRecorder(engine).record(fleet(3))
    procs = [hostmeter(db_url, tmp_path, "run", job, "--at", at, "--trigger", "schedule",
                       "--format", "json") for _ in range(3)]
    outs = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert sorted(o["status"] for o in outs) == ["skipped", "skipped", "succeeded"]
    runs = ledger(engine)
    assert sorted(r["status"] for r in runs) == ["skipped", "skipped", "succeeded"]
    assert len({r["logical_time"] for r in runs}) == 1
    data = content(engine)
    assert data["covered"] == hours
    if job == "close-billing-period":
        assert len(data["invoices"]) == 3 and all(i[1] == 1 for i in data["invoices"])

    # Identical data: forcing the same trigger again reproduces exactly what the winner wrote.
    winner = next(o for o in outs if o["status"] == "succeeded")
    forced = hostmeter(db_url, tmp_path, "run", job, "--at", at, "--force")
    assert forced.wait(timeout=300) == 0
    assert content(engine) == data
    assert winner["attempt"] == 1


def test_key_times_across_month_ends_and_the_tokyo_boundary() -> None:
    from jobs.registry import JOBS

    close, snap = JOBS["close-billing-period"], JOBS["snapshot-usage"]
    # Nov 1 03:00 in Tokyo is Oct 31 18:00 UTC: it closes October (Tokyo), keyed Oct 1 00:00 JST.
    nov1 = datetime(2026, 10, 31, 18, 0, tzinfo=UTC)
    assert close.key_time(nov1, ZONE, {}) == datetime(2026, 9, 30, 15, 0, tzinfo=UTC)
    # One minute before midnight UTC on Oct 31 is already November in Tokyo: closes October.
    assert close.key_time(datetime(2026, 10, 31, 23, 59, tzinfo=UTC), ZONE, {}) == (
        datetime(2026, 9, 30, 15, 0, tzinfo=UTC))
    assert close.key_time(nov1, ZONE, {"period": "2028-02"}) == datetime(
        2028, 1, 31, 15, 0, tzinfo=UTC)
    assert snap.key_time(datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC), ZONE, {}) == (
        datetime(2026, 10, 31, 23, 0, tzinfo=UTC))


@pytest.mark.slow
def test_sigkill_mid_run_then_a_new_trigger_completes_it(
    db_url: str, engine: Engine, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    UsageRecorder(engine).record(fleet(40))
    proc = hostmeter(db_url, tmp_path, "run", "close-billing-period", "--at", CLOSE_AT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill it once its ledger row says running
        with reading(engine) as conn:
            running = conn.execute(sa.select(sa.func.count()).where(
                job_runs.c.status == "running")).scalar_one()
        if running:
            break
        time.sleep(0.05)
    assert running, "the run never started"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    again = hostmeter(db_url, tmp_path, "run", "close-billing-period", "--at", CLOSE_AT,
                      "--format", "json")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    result = json.loads(out)
    assert (result["status"], result["attempt"]) == ("succeeded", 2)
    runs = ledger(engine)
    assert [r["status"] for r in runs] == ["failed", "succeeded"]
    assert runs[0]["error"].startswith("abandoned")

    # The data equals an uninterrupted run's, on a fresh database with the same usage.
    reference_url = request.getfixturevalue("empty_db_url")
    from metering import db

    ref = db.create_engine(reference_url)
    db.upgrade(ref)
    UsageRecorder(ref).record(fleet(40))
    clean = hostmeter(reference_url, tmp_path, "run", "close-billing-period", "--at", CLOSE_AT)
    assert clean.wait(timeout=300) == 0
    try:
        assert content(engine) == content(ref)
    finally:
        ref.dispose()


def test_a_key_that_succeeded_is_skipped_unless_forced(engine: Engine, db_url: str) -> None:
    settings = Settings(database_url=db_url)
    UsageRecorder(engine).record(fleet(1, hosts=1))
    at = datetime(2026, 2, 10, 10, 5, tzinfo=UTC)
    first = execute(engine, settings, RunRequest(job="snapshot-usage", scheduled_time=at))
    dup = execute(engine, settings, RunRequest(job="snapshot-usage",
                                               scheduled_time=at + timedelta(minutes=20)))
    forced = execute(engine, settings, RunRequest(job="snapshot-usage", scheduled_time=at,
                                                  force=True))
    assert [(o.status, o.attempt, o.exit_code) for o in (first, dup, forced)] == [
        ("succeeded", 1, 0), ("skipped", 1, 0), ("succeeded", 2, 0)]
    assert [r["status"] for r in ledger(engine)] == ["succeeded", "skipped", "succeeded"]
    assert {r["logical_time"] for r in ledger(engine)} == {"2026-02-10T10:00:00+00:00"}
    row = ledger(engine)[0]
    assert set(row) == {"run_id", "job", "logical_time", "scheduled_time", "shard", "trigger",
                        "attempt", "status", "counts", "error", "host", "pid", "started_at",
                        "finished_at", "deadline"}
    assert row["scheduled_time"] == "2026-02-10T10:05:00+00:00"
    assert last_success(engine, "snapshot-usage") == at  # the forced run's scheduled time
    assert row["counts"]["hours"] == 4 and row["pid"] == os.getpid()


def test_a_partial_run_is_retried_by_the_next_trigger(engine: Engine, db_url: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(database_url=db_url)
    UsageRecorder(engine).record(fleet(3, hosts=1))
    at = datetime.fromisoformat(CLOSE_AT)
    real_close = billing_jobs.close

    def failing_close(ctx: Any, logical_time: datetime, **kw: Any) -> dict[str, Any]:
        def flaky(sums: MonthSums, catalog: Catalog) -> Rating:
            if sums.tenant == "t001":
                raise RuntimeError("boom")
            return rate(sums, catalog)

        from billing.service import close_period

        req = billing_jobs._request(ctx, logical_time, kw.get("period"))
        out = close_period(ctx.engine, req, rate_fn=flaky)
        return {"status": out.status, **out.counts()}

    from jobs import registry

    spec = registry.JOBS["close-billing-period"]
    monkeypatch.setitem(registry.JOBS, "close-billing-period",
                        registry.JobSpec(**{**{f: getattr(spec, f) for f in spec.__slots__},
                                            "body": failing_close}))
    first = execute(engine, settings, RunRequest(job="close-billing-period", scheduled_time=at))
    assert (first.status, first.exit_code, first.counts["tenants_failed"]) == ("partial", 1, 1)
    monkeypatch.setitem(registry.JOBS, "close-billing-period",
                        registry.JobSpec(**{**{f: getattr(spec, f) for f in spec.__slots__},
                                            "body": real_close}))
    [retry] = failed_keys(engine, "close-billing-period", ZONE)  # what --retry-failed runs
    assert (retry.trigger, retry.scheduled_time, dict(retry.options)) == (
        "retry", at, {"period": PERIOD})
    second = execute(engine, settings, retry)
    assert (second.status, second.attempt) == ("succeeded", 2)
    assert failed_keys(engine, "close-billing-period", ZONE) == []
    assert (second.counts["invoices_written"], second.counts["unchanged"]) == (1, 2)


def test_a_stale_running_row_is_abandoned_and_retried(engine: Engine, db_url: str) -> None:
    settings = Settings(database_url=db_url)
    at = datetime(2026, 2, 10, 10, 5, tzinfo=UTC)
    with engine.begin() as conn:  # what a SIGKILLed process leaves behind
        conn.execute(sa.insert(job_runs).values(
            run_id="dead", job="snapshot-usage", logical_time=datetime(2026, 2, 10, 10,
                                                                      tzinfo=UTC),
            scheduled_time=at, shard="0/1", trigger="schedule", attempt=1, status="running",
            counts={},
            host="worker-7", pid=4242, started_at=at))
    out = execute(engine, settings, RunRequest(job="snapshot-usage", scheduled_time=at))
    assert (out.status, out.attempt) == ("succeeded", 2)
    dead = next(r for r in ledger(engine) if r["run_id"] == "dead")
    assert dead["status"] == "failed" and "4242" in dead["error"] and "worker-7" in dead["error"]


def test_shards_split_the_tenants_without_overlap(engine: Engine, db_url: str) -> None:
    settings = Settings(database_url=db_url)
    UsageRecorder(engine).record(fleet(12, hosts=1))
    at = datetime.fromisoformat(CLOSE_AT)
    outs = [execute(engine, settings, RunRequest(job="close-billing-period", scheduled_time=at,
                                                 shard=Shard(i, 3))) for i in range(3)]
    written = [o.counts["invoices_written"] for o in outs]
    assert sum(written) == 12 and all(w > 0 for w in written)
    assert [r["shard"] for r in ledger(engine)] == ["0/3", "1/3", "2/3"]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(bm.invoices)
                            ).scalar_one() == 12
    with pytest.raises(BadTrigger, match="cannot be sharded"):
        execute(engine, settings, RunRequest(job="snapshot-usage", scheduled_time=at,
                                             shard=Shard(0, 2)))


@pytest.mark.parametrize("text", ["1", "2/2", "-1/3", "a/b", "0/0"])
def test_bad_shards(text: str) -> None:
    with pytest.raises(BadTrigger):
        parse_shard(text)
    assert parse_shard("3/4") == Shard(3, 4)


def test_operator_checks_never_become_the_run_of_a_key(engine: Engine, db_url: str) -> None:
    settings = Settings(database_url=db_url)
    at = datetime.fromisoformat(CLOSE_AT)
    for options in ({"dry_run": True}, {"tenants": ("t000",)}):
        with pytest.raises(BadTrigger, match="operator checks"):
            execute(engine, settings, RunRequest(job="close-billing-period", scheduled_time=at,
                                                 options=options))
    assert ledger(engine) == []


@pytest.mark.slow
def test_cli_retry_failed_with_nothing_failed(db_url: str, tmp_path: Path) -> None:
    proc = hostmeter(db_url, tmp_path, "run", "close-billing-period", "--retry-failed")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == "close-billing-period: nothing to retry"
    bad = hostmeter(db_url, tmp_path, "run", "close-billing-period", "--retry-failed", "--force")
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and "hostmeter: error: --retry-failed takes no" in err
