"""The Lambda entry point (jobs.triggers.aws_lambda): both EventBridge payload shapes, at-least-once
delivery, failures that make the platform retry, and malformed events — on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billing import models as bm
from billing.errors import CoverageError
from jobs import registry
from jobs.runtime.errors import BadTrigger, JobFailed, UnknownJob
from jobs.runtime.locks import key_lock
from jobs.runtime.logconfig import configure_logging
from jobs.triggers import aws_lambda as aws
from jobs.triggers.runner import RunRequest, Shard, list_runs
from metering import db
from metering import models as m
from metering.errors import ConfigError
from metering.ingest import UsageRecorder
from metering.records import HostPost, PlanChange, Record
from metering.settings import Settings
from metering.timeutil import month_bounds

ZONE = Settings().zone
OCT_START, OCT_END = month_bounds("2026-10", ZONE)
T = "2026-10-15T10:05:00Z"  # the 10:05 UTC hourly trigger: snapshots 06:00–09:00
T_HOUR = "2026-10-15T10:00:00+00:00"
CLOSE_AT = "2026-11-01T03:00:00+09:00"  # the monthly trigger after October is over in Tokyo


def scheduler(job: str, at: Any, **extra: Any) -> dict[str, Any]:
    return {"job": job, "scheduled_time": at, **extra}


def rule(job: str, at: str, **extra: Any) -> dict[str, Any]:
    return {
        "version": "0", "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
        "detail-type": "Scheduled Event", "source": "aws.events", "account": "123456789012",
        "time": at, "region": "ap-northeast-1",
        "resources": ["arn:aws:events:ap-northeast-1:123456789012:rule/hostmeter-" + job],
        "detail": {"job": job, **extra},
    }


class FakeContext:
    aws_request_id = "req-0001"


@pytest.fixture
def engine(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """The test database, with the handler pointed at it and no cached engine/logging state."""
    monkeypatch.setenv("HOSTMETER_DATABASE_URL", db_url)
    aws._reset_for_tests()
    eng = db.create_engine(db_url)
    yield eng
    eng.dispose()
    aws._reset_for_tests()
    configure_logging(None, stream=io.StringIO())  # close the handler's log file


def ledger(engine: Engine) -> list[dict[str, Any]]:
    return list(reversed(list_runs(engine)))


def invoke(event: Any) -> dict[str, Any]:
    summary = aws.handler(event, FakeContext())
    assert json.loads(json.dumps(summary)) == summary  # JSON-serialisable, no default=
    return summary


def snapshots(engine: Engine) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """usage_snapshots rows, and which run wrote each snapshotted hour."""
    with engine.connect() as conn:
        rows = sorted(map(tuple, conn.execute(sa.select(m.usage_snapshots)).all()))
        sh = m.snapshot_hours
        hours = sorted(map(tuple, conn.execute(sa.select(sh.c.hour, sh.c.run_id)).all()))
    return rows, hours


def invoices(engine: Engine) -> list[tuple[Any, ...]]:
    inv, t = bm.invoices, m.tenants
    with engine.connect() as conn:
        return sorted(map(tuple, conn.execute(
            sa.select(t.c.key, inv.c.period, inv.c.revision, inv.c.status)
            .join(t, t.c.id == inv.c.tenant_id)).all()))


def seed_hourly(engine: Engine) -> None:
    """Two tenants posting in the hours the 10:05 trigger snapshots (and one it does not)."""
    recs: list[Record] = []
    for tenant in ("acme", "globex"):
        recs.append(PlanChange(tenant=tenant, plan="standard", at=OCT_START))
        for hh in (5, 6, 7, 8, 9):
            recs.append(HostPost(tenant=tenant, host="web-1", kind="standard",
                                 at=datetime(2026, 10, 15, hh, 3, tzinfo=UTC),
                                 metrics=("cpu", "mem")))
    UsageRecorder(engine).record(recs)


def seed_month(engine: Engine, tenants: list[str]) -> None:
    """Paying tenants with a few posts in October (the close snapshots the rest itself)."""
    recs: list[Record] = []
    for tenant in tenants:
        recs.append(PlanChange(tenant=tenant, plan="standard", at=OCT_START))
        for day in (0, 10, 20):
            recs.append(HostPost(tenant=tenant, host="h1", kind="standard",
                                 at=OCT_START + timedelta(days=day, minutes=2),
                                 metrics=("cpu",)))
    UsageRecorder(engine).record(recs)


# --- parsing (no database) ------------------------------------------------------------------


def test_both_shapes_parse_to_the_same_scheduled_request() -> None:
    expected = RunRequest(job="close-billing-period",
                          scheduled_time=datetime(2026, 10, 31, 18, tzinfo=UTC),
                          trigger="schedule", shard=Shard(1, 4), options={"period": "2026-10"})
    assert aws.parse_event(scheduler("close-billing-period", CLOSE_AT, shard="1/4",
                                     period="2026-10")) == expected
    assert aws.parse_event(rule("close-billing-period", "2026-10-31T18:00:00Z", shard="1/4",
                                period="2026-10")) == expected
    plain = aws.parse_event(rule("snapshot-usage", T))
    assert (plain.shard, plain.options, plain.force) == (Shard(), {}, False)
    assert plain.scheduled_time == datetime(2026, 10, 15, 10, 5, tzinfo=UTC)


# --- delivery: the same event twice does the work once --------------------------------------


@pytest.mark.parametrize("shape", [scheduler, rule], ids=["scheduler", "rule"])
def test_snapshot_usage_delivered_twice_does_the_work_once(
    engine: Engine, shape: Callable[..., dict[str, Any]]
) -> None:
    seed_hourly(engine)
    event = shape("snapshot-usage", T)
    first = invoke(json.loads(json.dumps(event)))
    after_first = snapshots(engine)
    second = invoke(json.loads(json.dumps(event)))

    assert (first["status"], second["status"]) == ("succeeded", "skipped")
    assert first["logical_time"] == second["logical_time"] == T_HOUR
    assert first["counts"]["hours"] == 4 and first["counts"]["tenant_hours"] == 8
    assert second["error"] == "already succeeded" and second["counts"] == {}
    runs = ledger(engine)
    assert [(r["status"], r["trigger"], r["run_id"]) for r in runs] == [
        ("succeeded", "schedule", first["run_id"]), ("skipped", "schedule", second["run_id"])]
    rows, hours = after_first
    assert len(rows) == 8 and {run for _, run in hours} == {first["run_id"]}
    assert snapshots(engine) == after_first  # the duplicate rewrote nothing


def test_a_rule_and_a_scheduler_payload_for_the_same_hour_share_one_key(engine: Engine) -> None:
    seed_hourly(engine)
    first = invoke(scheduler("snapshot-usage", "2026-10-15T19:05:00+09:00"))
    second = invoke(rule("snapshot-usage", "2026-10-15T10:07:30Z"))
    assert (first["status"], second["status"]) == ("succeeded", "skipped")
    assert [r["logical_time"] for r in ledger(engine)] == [T_HOUR, T_HOUR]
    assert [(o["scheduled_time"], r["scheduled_time"]) for o, r in
            zip((first, second), ledger(engine), strict=True)] == [
        ("2026-10-15T10:05:00+00:00",) * 2, ("2026-10-15T10:07:30+00:00",) * 2]


# --- close-billing-period: period and shards ------------------------------------------------


def test_close_with_a_period_bills_that_month_once(engine: Engine) -> None:
    tenants = ["acme", "globex", "initech"]
    seed_month(engine, tenants)
    # Scheduled in December: without the period the job would close November.
    event = scheduler("close-billing-period", "2026-12-01T03:00:00+09:00", period="2026-10")
    first = invoke(event)
    second = invoke(event)
    assert (first["status"], second["status"]) == ("succeeded", "skipped")
    assert first["logical_time"] == OCT_START.isoformat()
    assert (first["counts"]["period"], first["counts"]["invoices_written"]) == ("2026-10", 3)
    assert invoices(engine) == [(t, "2026-10", 1, "draft") for t in tenants]
    assert [r["status"] for r in ledger(engine)] == ["succeeded", "skipped"]


def test_close_sharded_across_two_workers(engine: Engine) -> None:
    tenants = [f"t{i:02d}" for i in range(8)]
    owned = {i: [t for t in tenants if Shard(i, 2).owns(t)] for i in (0, 1)}
    assert owned[0] and owned[1]  # both shards have work
    seed_month(engine, tenants)
    outs = [invoke(rule("close-billing-period", CLOSE_AT, shard=f"{i}/2", period="2026-10"))
            for i in (0, 1)]
    again = invoke(scheduler("close-billing-period", CLOSE_AT, shard="1/2"))

    assert [o["status"] for o in outs] == ["succeeded", "succeeded"]
    assert [o["counts"]["invoices_written"] for o in outs] == [len(owned[0]), len(owned[1])]
    assert again["status"] == "skipped" and again["shard"] == "1/2"
    assert [(r["shard"], r["status"]) for r in ledger(engine)] == [
        ("0/2", "succeeded"), ("1/2", "succeeded"), ("1/2", "skipped")]
    assert [i[0] for i in invoices(engine)] == tenants


# --- failures raise so the platform retries -------------------------------------------------


def test_a_failed_run_raises_and_its_redelivery_runs_again(engine: Engine) -> None:
    seed_month(engine, ["acme"])
    event = scheduler("close-billing-period", "2026-10-20T00:00:00Z", period="2026-10")
    with pytest.raises(JobFailed) as first:
        invoke(event)
    with pytest.raises(JobFailed) as second:
        invoke(event)

    runs = ledger(engine)
    assert [(r["status"], r["attempt"]) for r in runs] == [("failed", 1), ("failed", 2)]
    for exc, run in zip((first.value, second.value), runs, strict=True):
        message = str(exc)
        assert "\n" not in message
        for part in ("close-billing-period", "failed", run["run_id"], "CoverageError",
                     "not over yet"):
            assert part in message
        assert exc.context["status"] == "failed" and exc.context["run_id"] == run["run_id"]
        assert isinstance(exc.__cause__, CoverageError)
        assert json.dumps(exc.context["summary"])
    assert invoices(engine) == []


def test_a_partial_run_raises(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_done(ctx: Any, logical_time: datetime, **kw: Any) -> dict[str, Any]:
        return {"status": "partial", "tenants_processed": 1, "tenants_failed": 1}

    spec = registry.JOBS["snapshot-usage"]
    monkeypatch.setitem(registry.JOBS, "snapshot-usage", dataclasses.replace(spec, body=half_done))
    with pytest.raises(JobFailed, match=r"^snapshot-usage partial: run \w+ .*tenants_failed=1$"):
        invoke(scheduler("snapshot-usage", T))
    assert [r["status"] for r in ledger(engine)] == ["partial"]


# --- malformed events: refused before anything is written -----------------------------------

MALFORMED = [
    pytest.param(["snapshot-usage"], BadTrigger, "must be a JSON object", id="a_list"),
    pytest.param('{"job": "snapshot-usage"}', BadTrigger, "must be a JSON object", id="a_string"),
    pytest.param(None, BadTrigger, "must be a JSON object", id="null"),
    pytest.param({"scheduled_time": T}, BadTrigger, "no job", id="missing_job"),
    pytest.param({"job": 7, "scheduled_time": T}, BadTrigger, "no job", id="job_not_a_string"),
    pytest.param(scheduler("snapshot-usages", T), UnknownJob, "unknown job 'snapshot-usages'",
                 id="unknown_job"),
    pytest.param({"job": "snapshot-usage"}, BadTrigger, "Scheduler payload has no scheduled_time",
                 id="missing_time"),
    pytest.param(scheduler("snapshot-usage", "yesterday"), BadTrigger,
                 "is not an ISO 8601 instant", id="bad_time"),
    pytest.param(scheduler("snapshot-usage", 1760522700), BadTrigger, "must be an ISO 8601",
                 id="epoch_time"),
    pytest.param(scheduler("snapshot-usage", "2026-10-15T10:05:00"), BadTrigger,
                 "has no UTC offset", id="no_offset"),
    pytest.param(scheduler("close-billing-period", CLOSE_AT, shard="3/2"), BadTrigger,
                 "need 0 <= I < N", id="bad_shard"),
    pytest.param(scheduler("close-billing-period", CLOSE_AT, shard=1), BadTrigger,
                 "not a string I/N", id="shard_not_a_string"),
    pytest.param(scheduler("snapshot-usage", T, shard="0/2"), BadTrigger,
                 "cannot be sharded", id="shard_on_unshardable_job"),
    pytest.param(scheduler("snapshot-usage", T, period="2026-10"), BadTrigger,
                 "snapshot-usage takes no period", id="period_on_snapshot_usage"),
    pytest.param(scheduler("close-billing-period", CLOSE_AT, period="2026-13"), BadTrigger,
                 "is not a month", id="bad_period"),
    pytest.param(scheduler("close-billing-period", CLOSE_AT, perod="2026-10"), BadTrigger,
                 "unknown key(s) 'perod'", id="misspelt_key"),
    pytest.param(scheduler("snapshot-usage", T, force=True), BadTrigger,
                 "unknown key(s) 'force'", id="force_not_accepted"),
    pytest.param({**rule("snapshot-usage", T), "detail-type": "Object Created", "detail": {}},
                 BadTrigger, "'Object Created' is not 'Scheduled Event'",
                 id="other_detail_type"),
    pytest.param({**rule("snapshot-usage", T), "detail": {}}, BadTrigger, "no job",
                 id="rule_without_detail_job"),
    pytest.param({k: v for k, v in rule("snapshot-usage", T).items() if k != "detail"},
                 BadTrigger, "no detail object", id="rule_without_detail"),
    pytest.param({k: v for k, v in rule("snapshot-usage", T).items() if k != "time"},
                 BadTrigger, "Scheduled Event has no time", id="rule_without_time"),
    pytest.param(rule("snapshot-usage", "2026-10-15 10:05"), BadTrigger, "has no UTC offset",
                 id="rule_time_without_offset"),
    pytest.param(rule("nope", T), UnknownJob, "unknown job 'nope'", id="rule_unknown_job"),
    pytest.param(rule("snapshot-usage", T, scheduled_time=T), BadTrigger,
                 "unknown key(s) 'scheduled_time'", id="rule_detail_unknown_key"),
]


@pytest.mark.parametrize(("event", "error", "text"), MALFORMED)
def test_malformed_events_are_refused(engine: Engine, event: Any, error: type[Exception],
                                      text: str) -> None:
    with pytest.raises(error) as caught:
        aws.handler(event, FakeContext())
    assert type(caught.value) is error
    message = str(caught.value)
    assert text in message and "\n" not in message
    assert ledger(engine) == []


@pytest.mark.parametrize(("event", "error", "text"), MALFORMED)
def test_parse_event_refuses_them_itself(event: Any, error: type[Exception], text: str) -> None:
    """Without a database: validation does not lean on the runner."""
    with pytest.raises(error, match=re.escape(text)):
        aws.parse_event(event)


# --- environment: engine cache, logging, lock wait ------------------------------------------


def test_the_engine_is_cached_and_the_schema_checked_once(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = aws.ensure_schema

    def counting(engine: Engine, **kw: Any) -> None:
        calls.append(str(engine.url))
        real(engine, **kw)

    monkeypatch.setattr(aws, "ensure_schema", counting)
    monkeypatch.setenv("HOSTMETER_DATABASE_URL", empty_db_url)
    aws._reset_for_tests()
    try:
        outs = [invoke(scheduler("snapshot-usage", T)) for _ in range(3)]
        assert [o["status"] for o in outs] == ["succeeded", "skipped", "skipped"]
        assert len(calls) == 1 and len(aws._ENGINES) == 1  # an empty database was migrated
        cached = aws._ENGINES[empty_db_url]
        invoke(scheduler("snapshot-usage", "2026-10-15T11:05:00Z"))
        assert aws._ENGINES[empty_db_url] is cached
    finally:
        aws._reset_for_tests()
        configure_logging(None, stream=io.StringIO())
    assert aws._ENGINES == {}


def test_logs_go_to_the_log_dir_with_the_request_id(engine: Engine, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTMETER_LOG_DIR", str(tmp_path / "lambda-logs"))
    out = invoke(scheduler("snapshot-usage", T))
    events = [json.loads(line) for line in
              (tmp_path / "lambda-logs" / "hostmeter.jsonl").read_text().splitlines()]
    finished = [e for e in events if e["event"] == "job_finished"]
    assert len(finished) == 1 and finished[0]["run_id"] == out["run_id"]
    assert finished[0]["aws_request_id"] == "req-0001"


@pytest.mark.parametrize("log_dir", ["", "unwritable"])
def test_no_log_file_or_an_unwritable_one_still_runs(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_dir: str
) -> None:
    work = tmp_path / "task"
    work.mkdir()
    monkeypatch.chdir(work)  # Lambda's /var/task: no "logs" directory may appear here
    if log_dir:
        (tmp_path / "a-file").write_text("")
        log_dir = str(tmp_path / "a-file" / "logs")  # mkdir fails: a file is in the way
    monkeypatch.setenv("HOSTMETER_LOG_DIR", log_dir)
    assert invoke(scheduler("snapshot-usage", T))["status"] == "succeeded"
    assert list(work.iterdir()) == []


def test_a_held_key_is_waited_for_up_to_the_lock_wait(engine: Engine,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTMETER_LOCK_WAIT_S", "0.3")
    held, release = threading.Event(), threading.Event()

    def other_worker() -> None:  # a run of the same key in progress elsewhere, for up to 5 s
        with key_lock(engine, f"snapshot-usage|{T_HOUR}|0/1") as got:
            assert got
            held.set()
            release.wait(5)

    worker = threading.Thread(target=other_worker)
    worker.start()
    try:
        assert held.wait(10)
        out = invoke(scheduler("snapshot-usage", T))
    finally:
        release.set()
        worker.join()
    assert out["status"] == "skipped" and "0.3s" in out["error"]
    monkeypatch.setenv("HOSTMETER_LOCK_WAIT_S", "soon")
    with pytest.raises(ConfigError, match="HOSTMETER_LOCK_WAIT_S"):
        aws.handler(scheduler("snapshot-usage", T), None)
