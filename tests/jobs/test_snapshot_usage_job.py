"""``snapshot-usage`` as a job: its window, runs through ``run_job``, telemetry, and the CLI.

Job tests follow the house rule: seed usage before, inside and after the window plus duplicates,
run twice, and compare the database.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from jobs import snapshot_usage
from jobs.runtime.context import JobContext, JobResult, run_job
from jobs.runtime.logconfig import configure_logging
from jobs.synthetic.fleet import demo_fleet
from metering import db, snapshot
from metering import models as m
from metering.errors import InvalidWindow
from metering.ingest import UsageRecorder
from metering.records import AnomalyRole, HostPost, MonitorChange, PlanChange, Record, RoleMember
from metering.retention import prune
from metering.settings import Settings
from metering.timeutil import month_bounds

JOB = "snapshot-usage"
T = datetime(2026, 10, 15, 10, 5, tzinfo=UTC)  # the scheduled time of the 10:05 trigger
FIXED_CLOCK = datetime(2026, 10, 15, 10, 5, 30, tzinfo=UTC)


def at(hh: int, mm: int = 0, ss: int = 0, us: int = 0, *, day: int = 15) -> datetime:
    return datetime(2026, 10, day, hh, mm, ss, us, tzinfo=UTC)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


# --- the window -------------------------------------------------------------------------------

WINDOWS = [
    pytest.param("2026-10-15T10:05:00Z", 3,
                 ["06:00", "07:00", "08:00", "09:00"], id="10:05_default_lookback"),
    pytest.param("2026-10-15T10:00:00Z", 3,
                 ["06:00", "07:00", "08:00", "09:00"], id="exactly_10:00_last_hour_09"),
    pytest.param("2026-10-15T10:00:00Z", 0, ["09:00"], id="exactly_10:00_no_lookback"),
    pytest.param("2026-10-15T10:59:59.999999Z", 0, ["09:00"], id="10:59:59.999999"),
    pytest.param("2026-10-15T10:05:00Z", 0, ["09:00"], id="lookback_0"),
    pytest.param("2026-10-15T10:05:00Z", 1, ["08:00", "09:00"], id="lookback_1"),
    pytest.param("2026-10-15T19:05:00+09:00", 3,
                 ["06:00", "07:00", "08:00", "09:00"], id="offset_+09:00"),
    pytest.param("2026-10-15T15:35:00+05:30", 0, ["09:00"], id="half_hour_offset"),
]


@pytest.mark.parametrize(("logical", "lookback", "expected"), WINDOWS)
def test_window(logical: str, lookback: int, expected: list[str]) -> None:
    hours = snapshot_usage.window(utc(logical), lookback)
    assert hours == [datetime.fromisoformat(f"2026-10-15T{h}+00:00") for h in expected]
    assert all(h.utcoffset() == timedelta(0) for h in hours)


BOUNDARY_WINDOWS = [
    pytest.param("2026-11-01T00:05:00Z",
                 ["2026-10-31T20", "2026-10-31T21", "2026-10-31T22", "2026-10-31T23"],
                 id="month_and_day_boundary"),
    pytest.param("2026-11-01T02:00:00Z",
                 ["2026-10-31T22", "2026-10-31T23", "2026-11-01T00", "2026-11-01T01"],
                 id="window_straddles_midnight"),
    pytest.param("2027-01-01T00:05:00Z",
                 ["2026-12-31T20", "2026-12-31T21", "2026-12-31T22", "2026-12-31T23"],
                 id="year_boundary"),
    pytest.param("2028-03-01T00:05:00Z",
                 ["2028-02-29T20", "2028-02-29T21", "2028-02-29T22", "2028-02-29T23"],
                 id="leap_day"),
    # 09:05 in Tokyo on the 1st is 00:05Z: still the previous UTC day's last hours
    pytest.param("2026-11-01T09:05:00+09:00",
                 ["2026-10-31T20", "2026-10-31T21", "2026-10-31T22", "2026-10-31T23"],
                 id="tokyo_month_start"),
]


@pytest.mark.parametrize(("logical", "expected"), BOUNDARY_WINDOWS)
def test_window_across_day_and_month_boundaries(logical: str, expected: list[str]) -> None:
    assert snapshot_usage.window(utc(logical)) == [
        datetime.fromisoformat(f"{h}:00:00+00:00") for h in expected
    ]


def test_window_default_lookback_is_3() -> None:
    assert snapshot_usage.DEFAULT_LOOKBACK == 3
    assert len(snapshot_usage.window(T)) == 4


def test_window_rejects_negative_lookback_and_naive_times() -> None:
    with pytest.raises(ValueError, match="lookback"):
        snapshot_usage.window(T, -1)
    with pytest.raises(InvalidWindow):
        snapshot_usage.window(datetime(2026, 10, 15, 10, 5))


def test_backfill_hours_is_half_open() -> None:
    hours = snapshot_usage.backfill_hours(at(0, day=1), at(0, day=2))
    assert hours == [at(h, day=1) for h in range(24)]


# --- seeded runs ------------------------------------------------------------------------------

EARLY = at(0, day=1)


def seed() -> list[Record]:
    """Usage before (05:xx), inside (06:00–09:59) and after (10:xx) the window of T, with dups."""

    def post(tenant: str, host: str, when: datetime, metrics: tuple[str, ...],
             kind: str = "standard") -> HostPost:
        return HostPost(tenant=tenant, host=host, kind=kind, at=when, metrics=metrics)

    cpu_mem = ("cpu", "mem")
    return [
        PlanChange(tenant="acme", plan="standard", at=EARLY),
        PlanChange(tenant="beta", plan="trial", at=at(8, 0)),
        PlanChange(tenant="future", plan="standard", at=at(10, 0)),  # after the window
        post("acme", "h-1", at(5, 30), (*cpu_mem, "before")),
        post("acme", "h-1", at(6, 10), cpu_mem),
        post("acme", "h-1", at(7, 10), cpu_mem),
        post("acme", "h-1", at(7, 10), cpu_mem),  # duplicate post
        post("acme", "h-1", at(8, 10), cpu_mem),
        post("acme", "h-1", at(9, 59, 59, 999000), cpu_mem),
        post("acme", "h-1", at(10, 0), (*cpu_mem, "after")),  # the current hour, not complete
        post("acme", "h-2", at(6, 0), ("cpu",), kind="micro"),
        post("acme", "h-2", at(9, 30), ("cpu",), kind="micro"),
        post("beta", "h-1", at(8, 30), tuple(f"m.{i}" for i in range(210))),
        post("early", "h-1", at(5, 0), ("cpu",)),  # only before the window
        post("late", "h-1", at(10, 30), ("cpu",)),  # only after the window
        MonitorChange(tenant="acme", monitor="m-1", at=at(7, 30), present=True),
        AnomalyRole(tenant="acme", role="web", at=EARLY, enabled=True),
        RoleMember(tenant="acme", role="web", host="h-1", at=EARLY, member=True),
    ]


class Row(NamedTuple):
    tenant: str
    hour: datetime
    plan: str | None
    standard_hosts: int = 0
    micro_hosts: int = 0
    standard_overage: int = 0
    micro_overage: int = 0
    host_metrics: int = 0
    service_metrics: int = 0
    monitors: int = 0


WINDOW = [at(h) for h in (6, 7, 8, 9)]
EXPECTED_ROWS = [
    Row("acme", at(6), "standard", standard_hosts=1, micro_hosts=1, host_metrics=3),
    Row("acme", at(7), "standard", standard_hosts=1, host_metrics=2, monitors=1),
    Row("acme", at(8), "standard", standard_hosts=1, host_metrics=2, monitors=1),
    Row("acme", at(9), "standard", standard_hosts=1, micro_hosts=1, host_metrics=3, monitors=1),
    Row("beta", at(8), "trial", standard_hosts=1, standard_overage=10, host_metrics=210),
    Row("beta", at(9), "trial"),
]
EXPECTED_ROLES = [("acme", h, "web", 1) for h in WINDOW]
EXPECTED_COUNTS = {
    "hours": 4,
    "first_hour": "2026-10-15T06:00:00+00:00",
    "last_hour": "2026-10-15T09:00:00+00:00",
    "tenants_expected": 6,  # tenant-hours: the rows that should be, and that are, written
    "tenants_processed": 6,
    "tenant_hours": 6,
    "host_hours": 2 + 1 + 2 + 2,
    "host_metrics": 3 + 2 + (2 + 210) + 3,
    "role_rows": 4,
    "kept_pruned_hours": 0,
}


def usage_rows(engine: Engine) -> list[Row]:
    us, t = m.usage_snapshots, m.tenants
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.key, us.c.hour, *(us.c[c] for c in Row._fields[2:]))
            .join(t, t.c.id == us.c.tenant_id)
            .order_by(t.c.key, us.c.hour)
        )
        return [Row(*r) for r in rows]


def role_rows(engine: Engine) -> list[tuple[str, datetime, str, int]]:
    ur, t = m.usage_snapshot_roles, m.tenants
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.key, ur.c.hour, ur.c.role, ur.c.hosts)
            .join(t, t.c.id == ur.c.tenant_id)
            .order_by(t.c.key, ur.c.hour, ur.c.role)
        )
        return [(k, h, r, n) for k, h, r, n in rows]


def ledger(engine: Engine) -> list[tuple[Any, ...]]:
    sh = m.snapshot_hours
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(sh).order_by(sh.c.hour))]


def dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {
            t.name: [tuple(r) for r in conn.execute(sa.select(t).order_by(*t.primary_key))]
            for t in (m.usage_snapshots, m.usage_snapshot_roles)
        }


def context(engine: Engine, db_url: str, **kwargs: Any) -> JobContext:
    return JobContext(engine=engine, settings=Settings(database_url=db_url), **kwargs)


def run(engine: Engine, db_url: str, logical: datetime = T, **options: Any) -> JobResult:
    ctx = context(engine, db_url, clock=lambda: FIXED_CLOCK)
    return run_job(JOB, snapshot_usage.run, ctx, logical, **options)


@pytest.fixture
def seeded(engine: Engine) -> Engine:
    recorder = UsageRecorder(engine)
    recorder.record(seed())
    recorder.record(seed())  # the same delivery again
    return engine


def test_run_snapshots_the_window_and_nothing_else(seeded: Engine, db_url: str) -> None:
    result = run(seeded, db_url)

    assert result.status == "succeeded" and result.ok and result.error is None
    assert result.counts == EXPECTED_COUNTS
    assert usage_rows(seeded) == EXPECTED_ROWS
    assert role_rows(seeded) == EXPECTED_ROLES
    assert [r[0] for r in ledger(seeded)] == WINDOW
    # stamps come from the context's clock, the run id from the context
    assert {(r[1], r[2]) for r in ledger(seeded)} == {(FIXED_CLOCK, result.run_id)}


def test_running_twice_leaves_the_same_database(seeded: Engine, db_url: str) -> None:
    first = run(seeded, db_url)
    after_first = dump(seeded)
    ledger_first = ledger(seeded)

    second = run(seeded, db_url)

    assert second.run_id != first.run_id
    assert second.counts == first.counts
    assert dump(seeded) == after_first
    assert [(r[0], r[3]) for r in ledger(seeded)] == [(r[0], r[3]) for r in ledger_first]


def test_lookback_and_explicit_hours(seeded: Engine, db_url: str) -> None:
    result = run(seeded, db_url, lookback=0)
    assert result.counts["hours"] == 1
    assert [r[0] for r in ledger(seeded)] == [at(9)]
    assert {r.hour for r in usage_rows(seeded)} == {at(9)}

    result = run(seeded, db_url, hours=[at(5), at(10)])  # a backfill names its hours
    assert result.counts["first_hour"] == at(5).isoformat()
    assert [r[0] for r in ledger(seeded)] == [at(5), at(9), at(10)]
    assert {(r.tenant, r.hour) for r in usage_rows(seeded)} == {
        ("acme", at(5)), ("early", at(5)),
        ("acme", at(9)), ("beta", at(9)),
        ("acme", at(10)), ("beta", at(10)), ("future", at(10)), ("late", at(10)),
    }


def test_lookback_absorbs_late_posts(seeded: Engine, db_url: str) -> None:
    run(seeded, db_url, T)
    late = HostPost(tenant="acme", host="h-late", kind="standard", at=at(8, 45), metrics=("x",))
    UsageRecorder(seeded).record([late])
    assert ("acme", at(8)) in {(r.tenant, r.hour) for r in usage_rows(seeded)}
    before = {(r.tenant, r.hour): r for r in usage_rows(seeded)}
    assert before[("acme", at(8))].standard_hosts == 1

    run(seeded, db_url, T + timedelta(hours=1))  # 11:05: 07:00..10:00, 08:00 again

    after = {(r.tenant, r.hour): r for r in usage_rows(seeded)}
    assert after[("acme", at(8))].standard_hosts == 2
    assert after[("acme", at(6))] == before[("acme", at(6))]
    assert [r[0] for r in ledger(seeded)] == [at(h) for h in (6, 7, 8, 9, 10)]


# --- telemetry --------------------------------------------------------------------------------


def _check_events(events: list[dict[str, Any]], result: JobResult, logical: datetime) -> None:
    kinds = [e["event"] for e in events]
    assert kinds.count("job_started") == 1
    assert kinds.count("job_finished") == 1
    assert kinds[0] == "job_started" and kinds[-1] == "job_finished"
    for e in events:  # the run's identity is on every event, not only on the first and last
        assert e["job"] == JOB, e
        assert e["run_id"] == result.run_id, e
        assert e["logical_time"] == logical.isoformat(), e


@pytest.fixture
def default_structlog() -> Iterator[None]:
    """structlog as a library user gets it (no level filtering), whatever ran before."""
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("default_structlog")
def test_run_job_logs_one_started_and_one_finished(seeded: Engine, db_url: str) -> None:
    # capture_logs drops every configured processor; run_job binds its fields with contextvars,
    # so merge them back in exactly as the production configuration does.
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
        result = run(seeded, db_url)

    _check_events(events, result, T)
    started, finished = events[0], events[-1]
    assert started["trigger"] == "manual"
    assert finished["status"] == "succeeded"
    assert isinstance(finished["duration_s"], float) and finished["duration_s"] >= 0
    assert finished["duration_s"] == result.duration_s
    assert finished["error"] is None
    assert {k: finished[k] for k in EXPECTED_COUNTS} == EXPECTED_COUNTS
    per_hour = [e for e in events if e["event"] == "hour_snapshotted"]
    assert [e["hour"] for e in per_hour] == [h.isoformat() for h in WINDOW]
    # nothing stays bound after the run
    assert structlog.contextvars.get_contextvars() == {}


@pytest.fixture
def json_logs(tmp_path: Path) -> Iterator[tuple[Path, io.StringIO]]:
    """The production logging configuration, writing into ``tmp_path``; restored afterwards."""
    stream = io.StringIO()
    path = configure_logging(str(tmp_path / "joblogs"), stream=stream)
    assert path is not None
    structlog.contextvars.clear_contextvars()
    yield path, stream
    configure_logging(None, stream=io.StringIO())  # closes the file
    structlog.reset_defaults()


def test_json_log_file_carries_the_run_fields(
    seeded: Engine, db_url: str, json_logs: tuple[Path, io.StringIO]
) -> None:
    path, stream = json_logs

    result = run(seeded, db_url)
    structlog.get_logger("test").info("after_the_run")

    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert events[-1]["event"] == "after_the_run"
    assert "job" not in events[-1] and "run_id" not in events[-1]  # unbound after the run
    run_events = events[:-1]
    _check_events(run_events, result, T)
    for e in run_events:
        assert {"timestamp", "level", "event", "job", "run_id", "logical_time"} <= e.keys()
        assert e["timestamp"].endswith("Z")
    finished = run_events[-1]
    assert finished["level"] == "info"
    assert finished["status"] == "succeeded"
    assert finished["duration_s"] >= 0
    assert {k: finished[k] for k in EXPECTED_COUNTS} == EXPECTED_COUNTS
    assert [e["level"] for e in run_events if e["event"] == "hour_snapshotted"] == ["debug"] * 4
    # stderr (here: the stream) gets the same JSON lines from info up
    shown = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert shown == ["job_started", *["tenant_hour"] * 6, "job_finished", "after_the_run"]


def test_failed_run_logs_one_finished_with_the_error(
    empty_db_url: str, json_logs: tuple[Path, io.StringIO]
) -> None:
    path, _ = json_logs
    engine = db.create_engine(empty_db_url)  # no schema: snapshotting must fail
    try:
        result = run(engine, empty_db_url)
    finally:
        engine.dispose()

    assert result.status == "failed" and not result.ok
    assert result.error and "usage_retention" in result.error  # the first table it reads
    assert result.counts == {}
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    _check_events(events, result, T)
    assert [e["event"] for e in events] == ["job_started", "job_error", "job_finished"]
    assert events[-1]["status"] == "failed"
    assert events[-1]["error"] == result.error


@pytest.mark.usefixtures("default_structlog")
@pytest.mark.parametrize("returned", [None, 42], ids=["none", "int"])
def test_a_body_that_returns_no_counts_is_a_failed_run(returned: Any) -> None:
    engine = db.create_engine("sqlite://")  # the body never touches it
    ctx = context(engine, "sqlite://")
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
        result = run_job("broken", lambda _ctx, _t: returned, ctx, T)
    engine.dispose()
    assert result.status == "failed"
    assert result.counts == {}
    assert [e["event"] for e in events] == ["job_started", "job_error", "job_finished"]
    assert events[-1]["status"] == "failed"


# --- per-item events: one tenant_hour line per tenant-hour frozen ---------------------------

ITEM_FIELDS = {"tenant", "hour", "std", "micro", "metrics", "over", "svc", "mon", "plan"}
RUN_FIELDS = {"timestamp", "level", "event", "job", "run_id", "logical_time"}


def tenant_hour(tenant: str, hh: int, plan: str | None, *, std: int = 0, micro: int = 0,
                metrics: int = 0, over: int = 0, svc: int = 0, mon: int = 0) -> dict[str, Any]:
    return {"tenant": tenant, "hour": f"2026-10-15T{hh:02d}:00:00Z", "std": std,
            "micro": micro, "metrics": metrics, "over": over, "svc": svc, "mon": mon,
            "plan": plan}


# EXPECTED_ROWS as lines, by hour and tenant
EXPECTED_LINES = [
    tenant_hour("acme", 6, "standard", std=1, micro=1, metrics=3),
    tenant_hour("acme", 7, "standard", std=1, metrics=2, mon=1),
    tenant_hour("acme", 8, "standard", std=1, metrics=2, mon=1),
    tenant_hour("beta", 8, "trial", std=1, metrics=210, over=10),
    tenant_hour("acme", 9, "standard", std=1, micro=1, metrics=3, mon=1),
    tenant_hour("beta", 9, "trial"),
]


def items(events: list[dict[str, Any]], name: str = "tenant_hour") -> list[dict[str, Any]]:
    """The item fields of the ``name`` events, in order."""
    return [{k: v for k, v in e.items() if k not in RUN_FIELDS} for e in events
            if e["event"] == name]


def test_a_tenant_hour_line_per_row_frozen_and_again_on_a_rerun(
    seeded: Engine, db_url: str, json_logs: tuple[Path, io.StringIO]
) -> None:
    path, stream = json_logs

    first = run(seeded, db_url)
    second = run(seeded, db_url)  # the same hours frozen again: the same lines again

    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [e for e in events if e["event"] == "tenant_hour"]
    assert len(lines) == 2 * len(EXPECTED_ROWS)
    for e, result in zip(lines, [first] * 6 + [second] * 6, strict=True):
        assert e.keys() == ITEM_FIELDS | RUN_FIELDS, e  # exactly these fields, no others
        assert (e["level"], e["job"], e["run_id"], e["logical_time"]) == (
            "info", JOB, result.run_id, T.isoformat())
        assert e["timestamp"].endswith("Z")
    assert items(events) == EXPECTED_LINES + EXPECTED_LINES
    # each run's lines come after its rows are committed, before its job_finished
    kinds = [e["event"] for e in events if e["level"] != "debug"]
    assert kinds == 2 * ["job_started", *["tenant_hour"] * 6, "job_finished"]
    assert first.counts["tenants_processed"] == len(EXPECTED_LINES)
    # the same lines reach stderr (info and up), byte for byte
    assert [ln for ln in stream.getvalue().splitlines() if '"tenant_hour"' in ln] == [
        ln for ln in path.read_text(encoding="utf-8").splitlines() if '"tenant_hour"' in ln]


@pytest.mark.usefixtures("default_structlog")
def test_tenant_hour_events_under_any_structlog_configuration(seeded: Engine,
                                                             db_url: str) -> None:
    # capture_logs replaces the processors: the events come one by one, with the same fields
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
        result = run(seeded, db_url)
    assert items(events) == [{**e, "log_level": "info"} for e in EXPECTED_LINES]
    assert {e["run_id"] for e in events if e["event"] == "tenant_hour"} == {result.run_id}


def test_a_lookback_hour_frozen_again_logs_its_new_numbers(
    seeded: Engine, db_url: str, json_logs: tuple[Path, io.StringIO]
) -> None:
    path, _ = json_logs
    run(seeded, db_url, T, lookback=0)  # 09:00
    late = HostPost(tenant="acme", host="h-late", kind="standard", at=at(9, 45),
                    metrics=("x",))
    UsageRecorder(seeded).record([late])
    run(seeded, db_url, T + timedelta(hours=1), lookback=1)  # 09:00 again, and 10:00

    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    acme_9 = [e for e in items(events) if (e["tenant"], e["hour"]) == (
        "acme", "2026-10-15T09:00:00Z")]
    assert [(e["std"], e["metrics"]) for e in acme_9] == [(1, 3), (2, 4)]  # the latest wins


# --- completeness: tenants expected (from recorded usage) vs processed (rows written) ----------


def test_expected_equals_processed_on_a_generated_fleet(engine: Engine, db_url: str) -> None:
    zone = Settings().zone
    start, _ = month_bounds("2026-10", zone)
    end = start + timedelta(days=4)  # covers oscorp's monitor created on the 3rd at 10:30
    fleet = demo_fleet("2026-10", zone)
    UsageRecorder(engine).record(
        [r for t in fleet for r in t.records(zone) if r.at < end + timedelta(days=1)])
    hours = snapshot_usage.backfill_hours(start, end)

    result = run(engine, db_url, end, hours=hours)

    counts = result.counts
    assert counts["hours"] == 96
    assert counts["tenants_expected"] == counts["tenants_processed"] == counts["tenant_hours"]
    # every tenant of the fleet with a plan from the month's start, every hour
    assert counts["tenants_processed"] >= 96 * (len(fleet) - 1)  # stark signs up on the 15th


def test_a_tenant_the_snapshot_loses_shows_as_expected_above_processed(
    seeded: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch,
    json_logs: tuple[Path, io.StringIO],
) -> None:
    """A snapshot statement that drops a tenant (here: beta, 2 tenant-hours of the window)."""
    path, _ = json_logs
    whole = snapshot._usage_rows

    def losing_beta(hrs: Any, in_hours: Any, limits: Any) -> sa.Select[Any]:
        rows = whole(hrs, in_hours, limits).subquery()
        beta = sa.select(m.tenants.c.id).where(m.tenants.c.key == "beta").scalar_subquery()
        return sa.select(rows).where(rows.c.tenant_id != beta)

    monkeypatch.setattr(snapshot, "_usage_rows", losing_beta)
    result = run(seeded, db_url)

    assert result.status == "succeeded"
    assert (result.counts["tenants_expected"], result.counts["tenants_processed"]) == (6, 4)
    assert result.counts["tenant_hours"] == 4
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert items(events) == [e for e in EXPECTED_LINES if e["tenant"] != "beta"]
    [finished] = [e for e in events if e["event"] == "job_finished"]
    assert (finished["tenants_expected"], finished["tenants_processed"]) == (6, 4)


def test_hours_kept_for_pruned_raw_usage_are_in_neither_count(seeded: Engine,
                                                             db_url: str) -> None:
    first = run(seeded, db_url, hours=[at(8)])
    assert (first.counts["tenants_expected"], first.counts["tenants_processed"]) == (2, 2)
    with seeded.begin() as conn:  # prune-usage: the raw usage before 09:00 is gone
        prune(conn, at(9), now=FIXED_CLOCK)
    again = run(seeded, db_url, hours=[at(8), at(9)])
    assert again.counts["kept_pruned_hours"] == 1
    assert (again.counts["tenants_expected"], again.counts["tenants_processed"]) == (2, 2)


# --- the command line, as real processes ------------------------------------------------------

HOSTMETER = Path(sys.executable).parent / "hostmeter"
if not HOSTMETER.exists():  # pragma: no cover - an installation without the venv layout
    HOSTMETER = Path(shutil.which("hostmeter") or "hostmeter")


class Cli:
    """Runs the installed ``hostmeter`` console script against one database and log dir."""

    def __init__(self, db_url: str, log_dir: Path) -> None:
        self.db_url = db_url
        self.log_dir = log_dir

    def start(self, *args: str) -> subprocess.Popen[str]:
        env = {**os.environ, "HOSTMETER_DATABASE_URL": self.db_url,
               "HOSTMETER_LOG_DIR": str(self.log_dir), "HOSTMETER_LOG_FORMAT": "json"}
        return subprocess.Popen(
            [str(HOSTMETER), *args], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return finish(self.start(*args))

    def events(self) -> list[dict[str, Any]]:
        path = self.log_dir / "hostmeter.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture
def cli(db_url: str, tmp_path: Path) -> Cli:
    return Cli(db_url, tmp_path / "cli-logs")


@pytest.mark.slow
def test_cli_run_snapshot_usage(seeded: Engine, cli: Cli) -> None:
    proc = cli("run", JOB, "--at", "2026-10-15T10:05:00Z")

    assert proc.returncode == 0, proc.stderr
    assert "snapshot-usage succeeded" in proc.stdout
    assert [r[0] for r in ledger(seeded)] == WINDOW
    assert usage_rows(seeded) == EXPECTED_ROWS
    assert role_rows(seeded) == EXPECTED_ROLES
    after_first = dump(seeded)

    # The same trigger delivered again: the key (job, hour, shard) already succeeded.
    proc = cli("run", JOB, "--at", "2026-10-15T10:07:00Z", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["status"], out["counts"], out["error"]) == ("skipped", {}, "already succeeded")
    assert out["logical_time"] == "2026-10-15T10:00:00+00:00"  # the key: the trigger's hour
    assert dump(seeded) == after_first

    # --force runs it again and reproduces the same rows.
    proc = cli("run", JOB, "--at", "2026-10-15T10:05:00Z", "--force", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["status"], out["attempt"]) == ("succeeded", 2)
    assert out["counts"] == EXPECTED_COUNTS
    assert dump(seeded) == after_first
    finished = [e for e in cli.events() if e["event"] == "job_finished"]
    assert len(finished) == 2  # the skipped trigger did no work
    assert {e["logical_time"] for e in finished} == {"2026-10-15T10:05:00+00:00"}
    assert finished[-1]["run_id"] == out["run_id"]


@pytest.mark.slow
def test_cli_run_with_lookback_0(engine: Engine, cli: Cli) -> None:
    proc = cli("run", JOB, "--at", "2026-10-15T10:00:00Z", "--lookback", "0")
    assert proc.returncode == 0, proc.stderr
    assert [r[0] for r in ledger(engine)] == [at(9)]


@pytest.mark.slow
def test_cli_backfill_a_day(engine: Engine, cli: Cli) -> None:
    UsageRecorder(engine).record([PlanChange(tenant="acme", plan="standard", at=EARLY)])

    proc = cli("backfill", JOB, "--from", "2026-10-01T00:00:00Z", "--to", "2026-10-02T00:00:00Z",
               "--format", "json")

    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "succeeded" and out["counts"]["hours"] == 24
    day = [at(h, day=1) for h in range(24)]
    assert [r[0] for r in ledger(engine)] == day
    assert [(r.tenant, r.hour, r.plan) for r in usage_rows(engine)] == [
        ("acme", h, "standard") for h in day
    ]
    started = [e for e in cli.events() if e["event"] == "job_started"]
    assert len(started) == 1 and started[0]["trigger"] == "backfill"


AT = "2026-10-15T10:05:00Z"
DAY_1, DAY_2 = "2026-10-01T00:00:00Z", "2026-10-02T00:00:00Z"
BAD_INPUT = [  # (arguments, what the one-line error must name)
    (("run", "no-such-job", "--at", AT), "unknown job 'no-such-job'"),
    (("run", JOB, "--at", "not-a-time"), "--at"),
    (("run", JOB, "--at", "2026-10-15T10:05:00"), "--at"),  # no offset
    (("run", JOB, "--at", "2026-13-45T10:05:00Z"), "--at"),
    (("backfill", JOB, "--from", DAY_2, "--to", DAY_1), "--to"),  # --to before --from
    (("backfill", JOB, "--from", DAY_1, "--to", DAY_1), "--to"),  # empty window
    (("backfill", JOB, "--from", "yesterday", "--to", DAY_1), "--from"),
    (("backfill", JOB, "--from", DAY_1, "--to", "2026-10-02"), "--to"),  # no offset
    (("backfill", "no-such-job", "--from", DAY_1, "--to", DAY_2), "no-such-job"),
]


@pytest.mark.slow
# Arguments are rejected before the database is opened, so one backend is enough here.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(engine: Engine, cli: Cli) -> None:
    UsageRecorder(engine).record(seed())
    before = dump(engine)
    procs = [cli.start(*args) for args, _ in BAD_INPUT]  # independent processes, run at once

    for (args, mentions), proc in zip(BAD_INPUT, map(finish, procs), strict=True):
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (args, proc.stderr)
        assert lines[0].startswith("hostmeter: error: "), (args, lines[0])
        assert mentions in lines[0], (args, lines[0])
        assert proc.stdout == "", (args, proc.stdout)

    assert ledger(engine) == []
    assert dump(engine) == before
    assert [e for e in cli.events() if e["event"].startswith("job_")] == []


def test_run_rejects_options_the_job_does_not_take(tmp_path: Path) -> None:
    env = {**os.environ, "HOSTMETER_DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}",
           "HOSTMETER_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", "snapshot-usage", "--period", "2026-10"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "hostmeter: error: job snapshot-usage takes no --period" in proc.stderr
