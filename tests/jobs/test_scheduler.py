"""The local scheduler: EventBridge expressions → APScheduler triggers, catch-up, and a real run.

No database: ``fire`` and ``last_success`` are fakes that record calls. Times are UTC unless the
name says otherwise; 2026-10-15 is a Thursday.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from freezegun import freeze_time
from structlog.testing import capture_logs

from jobs import registry
from jobs.runtime.errors import JobError
from jobs.triggers.scheduler import (
    InvalidSchedule,
    LocalScheduler,
    default_catch_up_limit,
    fire_times,
    missed_fire_times,
    parse_schedule,
)

HOURLY = "cron(5 * * * ? *)"
CLOSE = "cron(0 3 1 * ? *)"
FINALIZE = "cron(0 3 4 * ? *)"
PRUNE = "cron(30 4 * * ? *)"
AGGREGATE = "rate(5 minutes)"
NOW = datetime(2026, 10, 15, 10, 20, tzinfo=UTC)


def utc(
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    microsecond: int = 0,
) -> datetime:
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeJob:
    """A registry entry as the scheduler sees it."""

    name: str
    schedule: str
    timezone: str = "UTC"


@dataclass(slots=True)
class FakeFire:
    """Records every ``fire`` call; raises for the jobs named in ``failing``."""

    calls: list[tuple[str, datetime, str]] = field(default_factory=list)
    failing: frozenset[str] = frozenset()

    def __call__(self, name: str, scheduled: datetime, trigger: str) -> None:
        self.calls.append((name, scheduled, trigger))
        if name in self.failing:
            raise RuntimeError(f"{name} broke")


def last_success_from(table: dict[str, datetime | None]) -> Callable[[str], datetime | None]:
    return lambda name: table[name]


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# --- parse_schedule / fire_times -----------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "timezone", "after", "expected"),
    [
        pytest.param(
            HOURLY,
            "UTC",
            utc(2026, 10, 15, 10, 5),
            [utc(2026, 10, 15, 11, 5), utc(2026, 10, 15, 12, 5)],
            id="snapshot-usage",
        ),
        pytest.param(
            CLOSE,
            "Asia/Tokyo",
            utc(2026, 10, 15),
            [utc(2026, 10, 31, 18), utc(2026, 11, 30, 18), utc(2026, 12, 31, 18)],
            id="close-billing-period: 03:00 JST on the 1st is 18:00Z the day before",
        ),
        pytest.param(
            FINALIZE,
            "Asia/Tokyo",
            utc(2026, 10, 15),
            [utc(2026, 11, 3, 18), utc(2026, 12, 3, 18)],
            id="finalize-invoices",
        ),
        pytest.param(
            PRUNE,
            "UTC",
            utc(2026, 10, 15, 4, 30),
            [utc(2026, 10, 16, 4, 30), utc(2026, 10, 17, 4, 30)],
            id="prune-usage",
        ),
        pytest.param(
            AGGREGATE,
            "UTC",
            utc(2026, 10, 15, 10, 2, 30),
            [utc(2026, 10, 15, 10, 5), utc(2026, 10, 15, 10, 10)],
            id="aggregate-job-logs on the 5-minute grid",
        ),
    ],
)
def test_registry_expressions_fire_at_these_utc_times(
    expression: str, timezone: str, after: datetime, expected: list[datetime]
) -> None:
    trigger = parse_schedule(expression, timezone)
    assert trigger.get_next_fire_time(None, after + timedelta(microseconds=1)) == expected[0]
    assert fire_times(expression, timezone, after, expected[-1]) == expected


@pytest.mark.parametrize("spec", registry.JOBS.values(), ids=lambda s: s.name)
def test_every_registry_schedule_parses(spec: registry.JobSpec) -> None:
    window = fire_times(spec.schedule, spec.timezone, NOW, NOW + timedelta(days=62))
    assert window and all(t.tzinfo is UTC for t in window)


def test_fire_times_are_strictly_after_start_and_up_to_end_inclusive() -> None:
    times = fire_times(HOURLY, "UTC", utc(2026, 10, 15, 9, 5), utc(2026, 10, 15, 11, 5))
    assert times == [utc(2026, 10, 15, 10, 5), utc(2026, 10, 15, 11, 5)]


def test_fire_times_of_a_tokyo_schedule_are_returned_in_utc() -> None:
    (t,) = fire_times(CLOSE, "Asia/Tokyo", utc(2026, 10, 15), utc(2026, 11, 15))
    assert t.tzinfo is UTC and t.isoformat() == "2026-10-31T18:00:00+00:00"


@pytest.mark.parametrize(
    ("expression", "timezone", "start", "expected"),
    [
        (
            "rate(1 hour)",
            "UTC",
            utc(2026, 10, 15, 10, 20),
            [utc(2026, 10, 15, 11), utc(2026, 10, 15, 12)],
        ),
        (
            "rate(1 day)",
            "Asia/Tokyo",
            utc(2026, 10, 15, 10, 20),
            [utc(2026, 10, 16), utc(2026, 10, 17)],
        ),
        (
            "rate(7 minutes)",
            "UTC",
            utc(2026, 10, 15, 10, 20),  # epoch seconds divisible by 420
            [utc(2026, 10, 15, 10, 23), utc(2026, 10, 15, 10, 30)],
        ),
    ],
)
def test_rate_fires_on_the_utc_epoch_grid_whenever_the_process_started(
    expression: str, timezone: str, start: datetime, expected: list[datetime]
) -> None:
    assert fire_times(expression, timezone, start, expected[-1]) == expected


WEEK = (utc(2026, 10, 11), utc(2026, 10, 25))  # two whole weeks, Sunday to Sunday


@pytest.mark.parametrize(
    ("day_of_week", "weekdays"),
    [
        ("2", {"Mon"}),
        ("1", {"Sun"}),
        ("7", {"Sat"}),
        ("MON-FRI", {"Mon", "Tue", "Wed", "Thu", "Fri"}),
        ("2-6", {"Mon", "Tue", "Wed", "Thu", "Fri"}),
        ("SUN,SAT", {"Sun", "Sat"}),
        ("1,7", {"Sun", "Sat"}),
        ("mon", {"Mon"}),
        ("*/2", {"Sun", "Tue", "Thu", "Sat"}),
        ("*", {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"}),
    ],
)
def test_day_of_week_counts_from_sunday_as_in_eventbridge(
    day_of_week: str, weekdays: set[str]
) -> None:
    times = fire_times(f"cron(0 9 ? * {day_of_week} *)", "UTC", *WEEK)
    assert {t.strftime("%a") for t in times} == weekdays
    assert all(t.hour == 9 and t.minute == 0 for t in times)
    assert len(times) == 2 * len(weekdays)


def test_monday_9am_in_tokyo_is_sunday_midnight_utc() -> None:
    (t,) = fire_times("cron(0 9 ? * MON *)", "Asia/Tokyo", utc(2026, 10, 17), utc(2026, 10, 24))
    assert t == utc(2026, 10, 19, 0)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("cron(*/15 * * * ? *)", [utc(2026, 10, 15, 10, m) for m in (0, 15, 30, 45)]),
        ("cron(0/20 * * * ? *)", [utc(2026, 10, 15, 10, m) for m in (0, 20, 40)]),
        ("cron(5/20 * * * ? *)", [utc(2026, 10, 15, 10, m) for m in (5, 25, 45)]),
        ("cron(10-40/15 * * * ? *)", [utc(2026, 10, 15, 10, m) for m in (10, 25, 40)]),
        ("cron(0 10,12 * * ? *)", [utc(2026, 10, 15, 10), utc(2026, 10, 15, 12)]),
        ("cron(0 0 1 JAN,JUL ? *)", [utc(2027, 1, 1), utc(2027, 7, 1)]),
        ("cron(0 0 1 1 ? 2028)", [utc(2028, 1, 1)]),
        ("cron(0 0 31 * ? *)", [utc(2026, 10, 31), utc(2026, 12, 31)]),  # no Nov 31
    ],
)
def test_cron_fields_take_steps_ranges_lists_and_names(
    expression: str, expected: list[datetime]
) -> None:
    start = utc(2026, 10, 15, 10, 0) - timedelta(microseconds=1)
    assert fire_times(expression, "UTC", start, expected[-1]) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "",
        "5 * * * ? *",
        "cron(5 * * * ?)",
        "cron(5 * * * ? * *)",
        "cron(5 * * * * *)",
        "cron(5 * ? * ? *)",
        "cron(? * * * ? *)",
        "cron(60 * * * ? *)",
        "cron(5 24 * * ? *)",
        "cron(0 0 0 * ? *)",
        "cron(0 0 1 13 ? *)",
        "cron(0 0 1 * ? 1969)",
        "cron(0 9 ? * 0 *)",
        "cron(0 9 ? * 8 *)",
        "cron(0 9 ? * FUN *)",
        "cron(0 3 L * ? *)",
        "cron(0 3 15W * ? *)",
        "cron(0 9 ? * 2#1 *)",
        "cron(0 9 ? * 6L *)",
        "cron(a * * * ? *)",
        "cron(40-10 * * * ? *)",
        "cron(*/0 * * * ? *)",
        "cron(*-5 * * * ? *)",
        "cron(1,,2 * * * ? *)",
        "rate(5)",
        "rate(0 minutes)",
        "rate(1 minutes)",
        "rate(5 minute)",
        "rate(1 second)",
        "rate(30 seconds)",
        "rate(2 weeks)",
        "rate(-5 minutes)",
        "at(2026-10-15T10:00:00)",
        "cron(5 * * * ? *)\nrate(5 minutes)",
    ],
)
def test_malformed_expressions_raise_a_one_line_value_error_naming_them(expression: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_schedule(expression, "UTC")
    message = str(caught.value)
    assert repr(expression) in message and "\n" not in message
    assert isinstance(caught.value, InvalidSchedule) and isinstance(caught.value, JobError)


def test_an_unknown_time_zone_is_an_invalid_schedule() -> None:
    with pytest.raises(InvalidSchedule, match="unknown time zone 'Mars/Olympus'"):
        parse_schedule(HOURLY, "Mars/Olympus")


def test_unsupported_tokens_are_named_in_the_message() -> None:
    with pytest.raises(InvalidSchedule, match="'L' in the day-of-month field is not supported"):
        parse_schedule("cron(0 3 L * ? *)", "UTC")
    with pytest.raises(InvalidSchedule, match="'2#1' in the day-of-week field is not supported"):
        parse_schedule("cron(0 9 ? * 2#1 *)", "UTC")
    assert parse_schedule("cron(0 9 ? JUL WED *)", "UTC")  # names with L and W are not tokens


# --- missed_fire_times ---------------------------------------------------------------------


def test_a_five_hour_gap_misses_five_hourly_fires_oldest_first() -> None:
    missed = missed_fire_times(HOURLY, "UTC", utc(2026, 10, 15, 5, 5), NOW)
    assert missed == [utc(2026, 10, 15, h, 5) for h in range(6, 11)]


def test_a_hundred_hour_gap_keeps_only_the_latest_48() -> None:
    missed = missed_fire_times(HOURLY, "UTC", NOW - timedelta(hours=100), NOW)
    assert len(missed) == 48
    assert missed[0] == utc(2026, 10, 13, 11, 5) and missed[-1] == utc(2026, 10, 15, 10, 5)


def test_a_job_that_never_succeeded_catches_up_only_its_latest_fire_time() -> None:
    assert missed_fire_times(HOURLY, "UTC", None, NOW) == [utc(2026, 10, 15, 10, 5)]
    assert missed_fire_times(CLOSE, "Asia/Tokyo", None, NOW) == [utc(2026, 9, 30, 18)]


def test_a_job_up_to_date_misses_nothing() -> None:
    assert missed_fire_times(HOURLY, "UTC", utc(2026, 10, 15, 10, 5), NOW) == []


def test_a_missed_month_end_in_tokyo_is_caught_up() -> None:
    last = utc(2026, 9, 30, 18)  # the Oct 1 03:00 JST run
    missed = missed_fire_times(CLOSE, "Asia/Tokyo", last, utc(2026, 11, 2))
    assert missed == [utc(2026, 10, 31, 18)]


def test_months_missed_beyond_the_monthly_limit_are_left_out() -> None:
    missed = missed_fire_times(CLOSE, "Asia/Tokyo", utc(2025, 12, 31, 18), utc(2026, 11, 2))
    assert missed == [utc(2026, 8, 31, 18), utc(2026, 9, 30, 18), utc(2026, 10, 31, 18)]


def test_an_explicit_limit_wins_over_the_default() -> None:
    missed = missed_fire_times(HOURLY, "UTC", NOW - timedelta(hours=100), NOW, limit=2)
    assert missed == [utc(2026, 10, 15, 9, 5), utc(2026, 10, 15, 10, 5)]
    with pytest.raises(ValueError, match="at least 1"):
        missed_fire_times(HOURLY, "UTC", None, NOW, limit=0)


def test_a_year_long_gap_of_a_five_minute_rate_returns_the_latest_48() -> None:
    missed = missed_fire_times(AGGREGATE, "UTC", NOW - timedelta(days=365), NOW)
    assert missed == [NOW - timedelta(minutes=5 * k) for k in range(47, -1, -1)]


@pytest.mark.parametrize(
    ("expression", "timezone", "limit"),
    [
        (HOURLY, "UTC", 48),
        (AGGREGATE, "UTC", 48),
        (PRUNE, "UTC", 7),
        ("cron(0 9 ? * MON-FRI *)", "UTC", 7),
        ("cron(0 9 ? * MON *)", "UTC", 3),
        (CLOSE, "Asia/Tokyo", 3),
        (FINALIZE, "Asia/Tokyo", 3),
    ],
)
def test_default_catch_up_limit_by_frequency(expression: str, timezone: str, limit: int) -> None:
    assert default_catch_up_limit(expression, timezone, NOW) == limit


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        missed_fire_times(HOURLY, "UTC", None, datetime(2026, 10, 15, 10, 20))


# --- LocalScheduler ------------------------------------------------------------------------

SNAPSHOT = FakeJob(name="snapshot-usage", schedule=HOURLY)
CLOSE_JOB = FakeJob(name="close-billing-period", schedule=CLOSE, timezone="Asia/Tokyo")
FINALIZE_JOB = FakeJob(name="finalize-invoices", schedule=FINALIZE, timezone="Asia/Tokyo")


def scheduler_for(
    jobs: list[FakeJob],
    last: dict[str, datetime | None],
    fire: FakeFire,
    now: Callable[[], datetime] | None = None,
) -> LocalScheduler:
    """A scheduler over fake jobs; the wall clock (frozen by freezegun) unless ``now`` is given."""
    table = {j.name: j for j in jobs}
    if now is None:
        return LocalScheduler(table, fire=fire, last_success=last_success_from(last))
    return LocalScheduler(table, fire=fire, last_success=last_success_from(last), now=now)


@freeze_time("2026-10-15T10:20:00Z")
def test_catch_up_after_a_gap_fires_each_missed_hour_in_order() -> None:
    fire = FakeFire()
    sched = scheduler_for([SNAPSHOT], {"snapshot-usage": utc(2026, 10, 15, 5, 5)}, fire)
    with capture_logs() as logs:
        sched.catch_up()
    assert fire.calls == [
        ("snapshot-usage", utc(2026, 10, 15, h, 5), "catch-up") for h in range(6, 11)
    ]
    logged = events(logs, "catch_up_fired")
    assert [e["scheduled_time"] for e in logged] == [
        f"2026-10-15T{h:02}:05:00+00:00" for h in range(6, 11)
    ]
    assert {e["job"] for e in logged} == {"snapshot-usage"}


@freeze_time("2026-10-15T10:20:00Z")
def test_catch_up_after_a_hundred_hours_fires_only_the_latest_48() -> None:
    fire = FakeFire()
    sched = scheduler_for([SNAPSHOT], {"snapshot-usage": NOW - timedelta(hours=100)}, fire)
    sched.catch_up()
    assert len(fire.calls) == 48
    assert fire.calls[0][1] == utc(2026, 10, 13, 11, 5)
    assert fire.calls[-1][1] == utc(2026, 10, 15, 10, 5)


@freeze_time("2026-10-15T10:20:00Z")
def test_catch_up_with_no_success_yet_fires_only_the_most_recent() -> None:
    fire = FakeFire()
    scheduler_for([SNAPSHOT], {"snapshot-usage": None}, fire).catch_up()
    assert fire.calls == [("snapshot-usage", utc(2026, 10, 15, 10, 5), "catch-up")]


@freeze_time("2026-11-05T00:00:00Z")
def test_catch_up_fires_missed_months_oldest_first_across_jobs() -> None:
    fire = FakeFire()
    sched = scheduler_for(  # finalize first in the registry: the order must come from the times
        [FINALIZE_JOB, CLOSE_JOB],
        {"close-billing-period": utc(2026, 9, 30, 18), "finalize-invoices": utc(2026, 10, 3, 18)},
        fire,
    )
    sched.catch_up()
    assert fire.calls == [
        ("close-billing-period", utc(2026, 10, 31, 18), "catch-up"),
        ("finalize-invoices", utc(2026, 11, 3, 18), "catch-up"),
    ]


@freeze_time("2026-10-15T10:20:00Z")
def test_a_failing_job_stops_its_own_catch_up_but_not_the_others() -> None:
    fire = FakeFire(failing=frozenset({"snapshot-usage"}))
    prune = FakeJob(name="prune-usage", schedule=PRUNE)
    sched = scheduler_for(
        [SNAPSHOT, prune],
        {"snapshot-usage": utc(2026, 10, 15, 5, 5), "prune-usage": utc(2026, 10, 13, 4, 30)},
        fire,
    )
    with capture_logs() as logs:
        done = sched.catch_up()
    assert fire.calls == [  # snapshot-usage 07:05 … 10:05 are not tried after 06:05 failed
        ("prune-usage", utc(2026, 10, 14, 4, 30), "catch-up"),
        ("prune-usage", utc(2026, 10, 15, 4, 30), "catch-up"),
        ("snapshot-usage", utc(2026, 10, 15, 6, 5), "catch-up"),
    ]
    assert [f.job for f in done] == ["prune-usage", "prune-usage"]
    (failure,) = events(logs, "catch_up_failed")
    assert (
        failure["job"] == "snapshot-usage"
        and failure["error"] == "RuntimeError: snapshot-usage broke"
    )


def test_a_scheduled_fire_carries_the_intended_fire_time_not_now() -> None:
    fire = FakeFire()
    clock = iter([utc(2026, 10, 15, 10, 5, 0, 400_000), utc(2026, 10, 15, 11, 4, 59)])
    sched = scheduler_for([SNAPSHOT], {"snapshot-usage": None}, fire, now=lambda: next(clock))
    with capture_logs() as logs:
        sched.fire_due("snapshot-usage")
        sched.fire_due("snapshot-usage")
    assert fire.calls == [("snapshot-usage", utc(2026, 10, 15, 10, 5), "schedule")] * 2
    assert [e["trigger"] for e in events(logs, "job_fired")] == ["schedule", "schedule"]


def test_a_bad_schedule_in_the_registry_fails_before_anything_runs() -> None:
    fire = FakeFire()
    bad = FakeJob(name="broken", schedule="cron(5 * * * * *)")
    with pytest.raises(InvalidSchedule, match=r"cron\(5 \* \* \* \* \*\)"):
        scheduler_for([SNAPSHOT, bad], {}, fire)
    assert fire.calls == []


def test_the_real_registry_builds_a_scheduler() -> None:
    sched = LocalScheduler(registry.JOBS, fire=FakeFire(), last_success=lambda name: None)
    assert not sched.running


FAR = utc(2099, 1, 1, 10, 20)  # the fake clock: APScheduler's real clock never reaches a fire


def test_start_catches_up_first_then_registers_coalescing_single_instance_jobs() -> None:
    running_during_fire: list[bool] = []
    fire = FakeFire()
    sched: LocalScheduler

    def recording_fire(name: str, scheduled: datetime, trigger: str) -> None:
        running_during_fire.append(sched.running)
        fire(name, scheduled, trigger)

    sched = LocalScheduler(
        {j.name: j for j in (SNAPSHOT, CLOSE_JOB)},
        fire=recording_fire,
        last_success=lambda name: None,
        now=lambda: FAR,
        misfire_grace_time=120,
    )
    with capture_logs() as logs:
        sched.start()
        try:
            jobs = {j.id: j for j in sched.apscheduler.get_jobs()}
        finally:
            sched.shutdown()
    assert [c[2] for c in fire.calls] == ["catch-up", "catch-up"] and running_during_fire == [
        False,
        False,
    ]
    assert set(jobs) == {"snapshot-usage", "close-billing-period"}
    for job in jobs.values():
        assert (job.coalesce, job.max_instances, job.misfire_grace_time) == (True, 1, 120)
    assert jobs["snapshot-usage"].next_run_time == utc(2099, 1, 1, 11, 5)
    assert jobs["close-billing-period"].next_run_time == utc(2099, 1, 31, 18)
    assert [e["event"] for e in logs if e["event"].startswith("scheduler_")] == [
        "scheduler_started",
        "scheduler_stopped",
    ]
    assert not sched.running


def every_second(expression: str, timezone: str) -> BaseTrigger:
    return CronTrigger(second="*", timezone=UTC)


def test_run_forever_fires_on_schedule_and_stops_cleanly_on_sigterm() -> None:
    """One real run: APScheduler fires a job each second; SIGTERM from the job stops it."""
    calls: list[tuple[str, datetime, str, datetime]] = []
    signalled = threading.Event()

    def fire(name: str, scheduled: datetime, trigger: str) -> None:
        calls.append((name, scheduled, trigger, datetime.now(UTC)))
        if trigger == "schedule" and not signalled.is_set():
            signalled.set()
            os.kill(os.getpid(), signal.SIGTERM)

    tick = FakeJob(name="tick", schedule="cron(* * * * ? *)")
    sched = LocalScheduler(
        {"tick": tick}, fire=fire, last_success=lambda name: None, trigger_factory=every_second
    )
    handler_before = signal.getsignal(signal.SIGTERM)
    fallback = threading.Timer(5.0, os.kill, (os.getpid(), signal.SIGTERM))
    fallback.start()  # only if the job never fires: run_forever must still return
    try:
        with capture_logs() as logs:
            code = sched.run_forever(poll_interval=0.05)
    finally:
        fallback.cancel()
    assert code == 0 and signalled.is_set()
    assert not sched.running and signal.getsignal(signal.SIGTERM) == handler_before
    catch_up, scheduled = calls[0], next(c for c in calls if c[2] == "schedule")
    assert catch_up[2] == "catch-up"
    assert scheduled[1] > catch_up[1] and scheduled[1].microsecond == 0
    assert scheduled[1] <= scheduled[3] < scheduled[1] + timedelta(seconds=1)
    names = [e["event"] for e in logs]
    assert names[0] == "catch_up_fired" and "job_fired" in names
    assert names.index("scheduler_started") < names.index("job_fired")
    assert names[-1] == "scheduler_stopped" and logs[-1]["reason"] == "SIGTERM"


def test_run_forever_refuses_to_run_off_the_main_thread() -> None:
    sched = LocalScheduler({}, fire=FakeFire(), last_success=lambda name: None)
    errors: list[BaseException] = []
    worker = threading.Thread(target=lambda: _capture(errors, sched.run_forever))
    worker.start()
    worker.join(5)
    assert len(errors) == 1 and "main thread" in str(errors[0])
    assert not sched.running


def _capture(errors: list[BaseException], call: Callable[[], object]) -> None:
    try:
        call()
    except RuntimeError as exc:
        errors.append(exc)
