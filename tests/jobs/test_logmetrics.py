"""aggregate-job-logs: incremental, checkpointed reading of job logs into bucketed metrics."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from jobs.monitoring import logmetrics as lm
from jobs.monitoring.store import job_metrics, log_runs

NOW = datetime(2026, 11, 1, 3, 7, tzinfo=UTC)


def finished(run_id: str, job: str, status: str, at: str, duration: float,
             **counts: Any) -> str:
    return json.dumps({"event": "job_finished", "level": "info", "timestamp": at, "job": job,
                       "run_id": run_id, "logical_time": at, "status": status,
                       "duration_s": duration, "error": None, **counts}) + "\n"


def other(at: str) -> str:
    return json.dumps({"event": "hour_snapshotted", "timestamp": at, "job": "x",
                       "run_id": "r"}) + "\n"


def points(engine: Engine) -> dict[tuple[str, str, str, str], Decimal]:
    with engine.connect() as conn:
        return {(r.name, r.bucket.strftime("%H:%M"), r.job, r.status): r.value
                for r in conn.execute(sa.select(job_metrics))}


def test_runs_become_bucketed_metrics(engine: Engine, tmp_path: Path) -> None:
    log = tmp_path / "hostmeter.jsonl"
    log.write_text(
        finished("a", "snapshot-usage", "succeeded", "2026-11-01T03:01:00Z", 1.5,
                 tenants_expected=3, tenants_processed=3, host_hours=10, host_metrics=900,
                 hours=4)
        + other("2026-11-01T03:01:30Z")
        + finished("b", "snapshot-usage", "succeeded", "2026-11-01T03:04:59Z", 2.5,
                   tenants_expected=4, tenants_processed=4, host_hours=12, host_metrics=1000,
                   hours=4)
        + finished("c", "close-billing-period", "partial", "2026-11-01T03:05:00Z", 9.0,
                   tenants_expected=5, tenants_processed=4, tenants_failed=1,
                   invoices_written=4, billed_standard_units=7, billed_micro_units=2,
                   billed_amount=14151)
        + "not json\n" + "[1, 2]\n"
    )
    out = lm.aggregate(engine, [tmp_path], now=NOW)
    assert (out.files, out.lines, out.runs, out.malformed) == (1, 6, 3, 2)
    got = points(engine)
    s, c = "snapshot-usage", "close-billing-period"
    assert got[("hostmeter.job.runs", "03:00", s, "succeeded")] == 2
    assert got[("hostmeter.job.runs", "03:05", c, "partial")] == 1
    assert got[("hostmeter.job.duration_seconds", "03:00", s, "")] == Decimal("2.5")
    assert got[("hostmeter.job.tenants_expected", "03:00", s, "")] == 7
    assert got[("hostmeter.job.tenants_failed", "03:05", c, "")] == 1
    assert got[("hostmeter.job.hosts_counted", "03:00", s, "")] == 22
    assert got[("hostmeter.billing.amount", "03:05", c, "")] == 14151
    assert got[("hostmeter.billing.standard_units", "03:05", c, "")] == 7
    assert got[("hostmeter.logs.malformed_lines", "03:05", "", "")] == 2
    assert ("hostmeter.job.tenants_failed", "03:00", s, "") not in got  # never reported


def test_reading_again_adds_nothing_and_new_lines_are_picked_up(engine: Engine,
                                                                tmp_path: Path) -> None:
    log = tmp_path / "hostmeter.jsonl"
    log.write_text(finished("a", "j", "succeeded", "2026-11-01T03:01:00Z", 1.0))
    lm.aggregate(engine, [log], now=NOW)
    before = points(engine)
    again = lm.aggregate(engine, [log], now=NOW)
    assert (again.lines, again.runs) == (0, 0) and points(engine) == before

    with log.open("a") as f:  # a new run, and half of another line still being written
        f.write(finished("b", "j", "failed", "2026-11-01T03:02:00Z", 2.0))
        f.write('{"event": "job_finished", "run_id": "c"')
    out = lm.aggregate(engine, [log], now=NOW)
    assert (out.lines, out.runs, out.malformed) == (1, 1, 0)
    with log.open("a") as f:
        f.write(', "job": "j", "status": "succeeded", "timestamp": "2026-11-01T03:03:00Z",'
                ' "duration_s": 1}\n')
    assert lm.aggregate(engine, [log], now=NOW).runs == 1
    assert points(engine)[("hostmeter.job.runs", "03:00", "j", "succeeded")] == 2


def test_rotation_and_truncation_are_survived(engine: Engine, tmp_path: Path) -> None:
    log = tmp_path / "hostmeter.jsonl"
    log.write_text(finished("a", "j", "succeeded", "2026-11-01T03:01:00Z", 1.0))
    lm.aggregate(engine, [tmp_path], now=NOW)
    # Rotation: the file is renamed and a new one starts; both are read once.
    os.rename(log, tmp_path / "hostmeter.jsonl.1")
    log.write_text(finished("b", "j", "succeeded", "2026-11-01T03:02:00Z", 1.0))
    out = lm.aggregate(engine, [tmp_path], now=NOW)
    assert out.runs == 1  # "a" was read before, under its new name too
    # Truncation in place: the file starts over, shorter than the checkpoint.
    log.write_text(finished("c", "j", "succeeded", "2026-11-01T03:03:00Z", 1.0)[:0]
                   + finished("c", "j", "ok", "2026-11-01T03:03:00Z", 1.0)[:60] + "\n")
    out = lm.aggregate(engine, [tmp_path], now=NOW)
    assert out.malformed == 1
    log.write_text(finished("d", "j", "succeeded", "2026-11-01T03:04:00Z", 1.0))
    assert lm.aggregate(engine, [tmp_path], now=NOW).runs == 1
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(log_runs.c.run_id)).scalars()) == [
            "a", "b", "d"]


def test_missing_paths_read_nothing(engine: Engine, tmp_path: Path) -> None:
    out = lm.aggregate(engine, [tmp_path / "nope"], now=NOW)
    assert (out.files, out.runs) == (0, 0)


def test_overdue_runs_come_from_the_ledger_and_survive_the_recompute(
    engine: Engine, tmp_path: Path
) -> None:
    """A stuck or killed run writes no job_finished line: the pass reads the run ledger."""
    from datetime import timedelta

    from jobs.runtime.ledger import job_runs

    start = NOW - timedelta(hours=3)
    with engine.begin() as conn:
        conn.execute(sa.insert(job_runs), [
            dict(run_id=run_id, job=job, logical_time=start, scheduled_time=start,
                 shard="0/1", trigger="schedule", attempt=1, status=status, counts={},
                 host="w", pid=1, started_at=start, deadline=start + bound)
            for run_id, job, status, bound in (
                ("stuck", "close-billing-period", "running", timedelta(hours=2)),
                ("slow", "snapshot-usage", "running", timedelta(hours=4)),  # not yet overdue
                ("done", "prune-usage", "succeeded", timedelta(hours=1)),
            )])
    log = tmp_path / "hostmeter.jsonl"
    log.write_text(finished("r1", "prune-usage", "succeeded", "2026-11-01T02:00:00Z", 1.0))
    lm.aggregate(engine, [log], now=NOW)
    overdue = {job: v for (name, bucket, job, _), v in points(engine).items()
               if name == lm.OVERDUE}
    assert overdue == {"close-billing-period": 1, "snapshot-usage": 0, "prune-usage": 0}
    lm.aggregate(engine, [log], now=NOW)  # a second pass recomputes the log metrics
    assert {job for (name, _, job, _) in points(engine) if name == lm.OVERDUE} == set(overdue)
