"""The local scheduler: registry schedules (EventBridge Scheduler expressions) run by APScheduler.

``hostmeter scheduler`` runs every registered job on its schedule in one long-lived process, the
local stand-in for EventBridge Scheduler. What it does:

- :func:`parse_schedule` turns ``cron(…)`` and ``rate(…)`` into APScheduler 3.x triggers, with
  EventBridge's rules (``?`` in exactly one day field, day-of-week ``1``-``7`` = SUN-SAT) and a
  one-line :class:`InvalidSchedule` (a ``ValueError``) for anything it does not accept.
- ``rate(…)`` fires on the UTC epoch grid (``rate(5 minutes)`` at :00, :05, …; ``rate(1 day)``
  at 00:00 UTC whatever the time zone), so fire times never depend on when the process started.
- On start, :meth:`LocalScheduler.catch_up` fires each job for the fire times it missed since
  its last success (trigger ``"catch-up"``), bounded by :func:`default_catch_up_limit`.
- With a ``retry`` callable, a retry pass runs after catch-up and then every ``retry_interval``
  (default 15 minutes): it runs again the keys whose run failed or was killed (the run ledger's
  :func:`~jobs.triggers.runner.retry_failed`). Catch-up alone would not: it resumes after the
  last success, and a key killed before a later success is behind it.
- Then APScheduler fires each job (trigger ``"schedule"``) with ``coalesce=True``,
  ``max_instances=1`` and a misfire grace time. The scheduled time handed to ``fire`` is the
  job's latest fire time at or before the clock when APScheduler calls it, computed from the same
  trigger (APScheduler 3.x does not pass ``scheduled_run_time`` to the job function). APScheduler
  calls a job only once its run time has come and, coalescing, for the latest due run time, so
  the two agree unless a call starts a whole interval late — then the job is fired for the newer
  fire time, which is what coalescing means.

The scheduler runs nothing itself: ``fire`` and ``last_success`` are injected (the run ledger
provides them), so this module imports neither the ledger nor the job bodies.
"""

from __future__ import annotations

import itertools
import queue
import re
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from jobs.runtime.errors import JobError
from metering.db import describe_error

__all__ = [
    "DEFAULT_MISFIRE_GRACE_TIME",
    "DEFAULT_RETRY_INTERVAL",
    "TRIGGER_CATCH_UP",
    "TRIGGER_SCHEDULE",
    "Clock",
    "Fire",
    "Firing",
    "InvalidSchedule",
    "LastSuccess",
    "LocalScheduler",
    "ScheduledJob",
    "TriggerFactory",
    "default_catch_up_limit",
    "fire_times",
    "missed_fire_times",
    "parse_schedule",
]

Fire = Callable[[str, datetime, str], object]
"""``fire(job_name, scheduled_time_utc, trigger_label)``: run one job for one scheduled time."""

LastSuccess = Callable[[str], datetime | None]
"""``last_success(job_name)``: the scheduled time (aware UTC) of its last success, or None."""

Clock = Callable[[], datetime]
"""Returns the current time, timezone-aware."""

TriggerFactory = Callable[[str, str], BaseTrigger]
"""``factory(expression, timezone)`` -> an APScheduler trigger (:func:`parse_schedule`)."""

TRIGGER_SCHEDULE = "schedule"
TRIGGER_CATCH_UP = "catch-up"
DEFAULT_MISFIRE_GRACE_TIME = 300
"""Seconds a fire may start late and still run (APScheduler ``misfire_grace_time``)."""
DEFAULT_RETRY_INTERVAL = timedelta(minutes=15)
"""How often the retry pass runs (when the scheduler is given one)."""
RETRY_JOB_ID = "retry-failed"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TICK = timedelta(microseconds=1)
_FIRST_LOOKBACK = timedelta(hours=1)
_MAX_LOOKBACK = timedelta(days=4 * 366)
"""How far back the latest fire time is searched for (a yearly, even a Feb 29, schedule fits)."""


class InvalidSchedule(JobError, ValueError):
    """A schedule expression or time zone this scheduler (or EventBridge) does not accept."""


class ScheduledJob(Protocol):
    """What the scheduler reads from a registry entry (:class:`jobs.registry.JobSpec`)."""

    @property
    def name(self) -> str: ...
    @property
    def schedule(self) -> str: ...
    @property
    def timezone(self) -> str: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Firing:
    """One call of ``fire``: the job, the scheduled time it ran for (UTC) and why."""

    job: str
    scheduled_time: datetime
    trigger: str


# --- parsing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Field:
    """One field of an EventBridge cron expression: its range and the names it accepts."""

    name: str
    low: int
    high: int
    names: Mapping[str, int]


_MONTHS = {
    m: i
    for i, m in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1
    )
}
_WEEKDAYS = {d: i for i, d in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"), 1)}
_APS_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
"""APScheduler weekday names indexed by EventBridge number - 1 (APScheduler's numbers: mon=0)."""

_FIELDS = (
    _Field(name="minutes", low=0, high=59, names={}),
    _Field(name="hours", low=0, high=23, names={}),
    _Field(name="day-of-month", low=1, high=31, names={}),
    _Field(name="month", low=1, high=12, names=_MONTHS),
    _Field(name="day-of-week", low=1, high=7, names=_WEEKDAYS),
    _Field(name="year", low=1970, high=2199, names={}),
)
_ELEMENT = re.compile(r"(?P<first>\*|\w+)(?:-(?P<last>\w+))?(?:/(?P<step>\d+))?")
_UNSUPPORTED = re.compile(r"#|^(?:\d*L|\d+W|LW)$", re.IGNORECASE)
"""``L`` (last), ``W`` (weekday) and ``#`` (nth weekday): EventBridge has them, we do not."""
_RATE = re.compile(r"(?P<value>\d+)\s+(?P<unit>minutes?|hours?|days?)")
_WRAPPED = re.compile(r"(?P<kind>cron|rate)\((?P<body>.*)\)")


def _invalid(expression: str, reason: str, **context: Any) -> InvalidSchedule:
    return InvalidSchedule(
        f"invalid schedule {expression!r}: {reason}", expression=expression, **context
    )


def _zone(expression: str, timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise _invalid(expression, f"unknown time zone {timezone!r}", timezone=timezone) from None


def _number(token: str, field: _Field, expression: str) -> int:
    value = field.names.get(token.upper()) if field.names else None
    if value is None:
        if not token.isdigit():
            raise _invalid(expression, f"{token!r} is not a value of the {field.name} field")
        value = int(token)
    if not field.low <= value <= field.high:
        raise _invalid(
            expression, f"{field.name} value {token} is outside {field.low}-{field.high}"
        )
    return value


def _element_values(element: str, field: _Field, expression: str) -> set[int]:
    """The values one comma-separated element (``*``, ``5``, ``1-5``, ``*/15``, ``0/20``) means."""
    match = _ELEMENT.fullmatch(element)
    if match is None:
        raise _invalid(expression, f"cannot read {element!r} in the {field.name} field")
    first, last, step = match["first"], match["last"], match["step"]
    if first == "*":
        if last is not None:
            raise _invalid(expression, f"cannot read {element!r} in the {field.name} field")
        low, high = field.low, field.high
    else:
        low = _number(first, field, expression)
        high = (
            _number(last, field, expression)
            if last is not None
            else (field.high if step is not None else low)
        )
    if low > high:
        raise _invalid(expression, f"range {element!r} in the {field.name} field runs backwards")
    if step is not None and int(step) == 0:
        raise _invalid(expression, f"step 0 in the {field.name} field")
    return set(range(low, high + 1, int(step) if step else 1))


def _field_values(text: str, field: _Field, expression: str) -> list[int] | None:
    """The sorted values a field allows, or None for ``*`` (every value)."""
    if text == "*":
        return None
    values: set[int] = set()
    for element in text.split(","):
        if _UNSUPPORTED.search(element):
            raise _invalid(
                expression, f"{element!r} in the {field.name} field is not supported (no L, W or #)"
            )
        values |= _element_values(element, field, expression)
    return sorted(values)


def _aps_field(values: list[int] | None) -> str:
    return "*" if values is None else ",".join(map(str, values))


def _aps_weekdays(values: list[int] | None) -> str:
    """EventBridge weekdays (1=SUN … 7=SAT) as APScheduler names (``mon``-based numbering)."""
    return "*" if values is None else ",".join(_APS_WEEKDAYS[v - 1] for v in values)


def _cron_trigger(body: str, expression: str, zone: ZoneInfo) -> CronTrigger:
    texts = body.split()
    if len(texts) != len(_FIELDS):
        raise _invalid(
            expression,
            f"cron needs 6 fields (minutes hours day-of-month month "
            f"day-of-week year), got {len(texts)}",
        )
    minute, hour, dom, month, dow, year = texts
    if (dom == "?") == (dow == "?"):
        raise _invalid(expression, "exactly one of day-of-month and day-of-week must be '?'")
    if "?" in (minute, hour, month, year):
        raise _invalid(expression, "'?' is only allowed in day-of-month or day-of-week")
    values = [
        None if text == "?" else _field_values(text, field, expression)
        for text, field in zip(texts, _FIELDS, strict=True)
    ]
    return CronTrigger(
        year=_aps_field(values[5]),
        month=_aps_field(values[3]),
        day=_aps_field(values[2]),
        day_of_week=_aps_weekdays(values[4]),
        hour=_aps_field(values[1]),
        minute=_aps_field(values[0]),
        second=0,
        timezone=zone,
    )


def _rate_trigger(body: str, expression: str) -> IntervalTrigger:
    match = _RATE.fullmatch(body)
    if match is None:
        raise _invalid(expression, "rate needs 'N minute(s)|hour(s)|day(s)'")
    value, unit = int(match["value"]), match["unit"]
    if value == 0:
        raise _invalid(expression, "a rate must be at least 1")
    if (value == 1) == unit.endswith("s"):  # EventBridge: "1 minute", "5 minutes"
        raise _invalid(expression, "use a singular unit for 1 and a plural unit otherwise")
    unit = unit.rstrip("s") + "s"
    return IntervalTrigger(**{unit: value}, start_date=_EPOCH, timezone=UTC)


def parse_schedule(expression: str, timezone: str) -> BaseTrigger:
    """Translate an EventBridge Scheduler expression into an APScheduler 3.x trigger.

    ``cron(minutes hours day-of-month month day-of-week year)`` becomes a :class:`CronTrigger` in
    ``timezone``: fields take ``*``, numbers, ``a-b``, lists ``a,b``, steps ``*/n``, ``a/n`` and
    ``a-b/n``, names ``JAN``-``DEC`` and ``SUN``-``SAT``; exactly one of day-of-month and
    day-of-week is ``?``; day-of-week ``1``-``7`` is SUN-SAT. ``L``, ``W`` and ``#`` are not
    supported. ``rate(N minute(s)|hour(s)|day(s))`` becomes an :class:`IntervalTrigger` on the
    UTC epoch grid (``timezone`` is checked but does not move it).

    Raises :class:`InvalidSchedule` (a ``ValueError``) with a one-line message naming the
    expression.
    """
    match = _WRAPPED.fullmatch(expression)
    if match is None:
        raise _invalid(expression, "expected cron(…) or rate(…)")
    zone = _zone(expression, timezone)
    if match["kind"] == "rate":
        return _rate_trigger(match["body"], expression)
    return _cron_trigger(match["body"], expression, zone)


# --- fire times ----------------------------------------------------------------------------


def _utc(value: datetime, what: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got {value.isoformat()}")
    return value.astimezone(UTC)


def _iter_fire_times(trigger: BaseTrigger, start: datetime) -> Iterator[datetime]:
    """The fire times of ``trigger`` after ``start``, in order, in UTC."""
    previous: datetime | None = None
    t = trigger.get_next_fire_time(None, start + _TICK)
    while t is not None:
        t = t.astimezone(UTC)
        if previous is not None and t <= previous:
            raise RuntimeError(f"trigger {trigger} does not advance past {t.isoformat()}")
        yield t
        previous = t
        t = trigger.get_next_fire_time(t, t + _TICK)


def _trigger_fire_times(trigger: BaseTrigger, start: datetime, end: datetime) -> list[datetime]:
    """Every fire time t of ``trigger`` with start < t <= end, in UTC."""
    return list(itertools.takewhile(lambda t: t <= end, _iter_fire_times(trigger, start)))


def _latest_fire_times(
    trigger: BaseTrigger, after: datetime | None, now: datetime, count: int
) -> list[datetime]:
    """The last ``count`` fire times t with after < t <= now (oldest first).

    Searches windows ending at ``now`` that double in length, so a long gap costs about twice
    the fire times returned, not every fire time since ``after``. Without ``after`` the search
    stops at :data:`_MAX_LOOKBACK`.
    """
    floor = after if after is not None else now - _MAX_LOOKBACK
    span = _FIRST_LOOKBACK
    while True:
        start = max(now - span, floor)
        times = _trigger_fire_times(trigger, start, now)
        if len(times) >= count or start == floor:
            return times[-count:]
        span *= 2


def fire_times(expression: str, timezone: str, start: datetime, end: datetime) -> list[datetime]:
    """Every fire time t of the schedule with start < t <= end, as aware UTC datetimes."""
    trigger = parse_schedule(expression, timezone)
    return _trigger_fire_times(trigger, _utc(start, "start"), _utc(end, "end"))


_CATCH_UP_LIMITS = (
    (timedelta(hours=1), 48),  # hourly or faster: two days of hours
    (timedelta(days=1), 7),  # daily: a week
)
_CATCH_UP_LIMIT_SLOWER = 3  # weekly, monthly: a quarter's worth of months


def _catch_up_limit(trigger: BaseTrigger, now: datetime) -> int:
    upcoming = list(itertools.islice(_iter_fire_times(trigger, now), 5))
    gaps = [b - a for a, b in itertools.pairwise(upcoming)]
    if not gaps:
        return _CATCH_UP_LIMIT_SLOWER
    for period, limit in _CATCH_UP_LIMITS:
        if min(gaps) <= period:
            return limit
    return _CATCH_UP_LIMIT_SLOWER


def default_catch_up_limit(expression: str, timezone: str, now: datetime) -> int:
    """How many missed fire times catch-up replays when no limit is given.

    By the shortest gap between the next fire times after ``now``: hourly or faster → 48 (two
    days; ``snapshot-usage``'s look-back re-covers recent hours anyway), up to daily → 7,
    slower (weekly, monthly) → 3. Older fire times are left to ``hostmeter run``/``backfill``.
    """
    return _catch_up_limit(parse_schedule(expression, timezone), _utc(now, "now"))


def _missed(
    trigger: BaseTrigger, last_success: datetime | None, now: datetime, limit: int | None
) -> list[datetime]:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if last_success is None:
        return _latest_fire_times(trigger, None, now, 1)
    count = limit if limit is not None else _catch_up_limit(trigger, now)
    return _latest_fire_times(trigger, _utc(last_success, "last_success"), now, count)


def missed_fire_times(
    expression: str,
    timezone: str,
    last_success: datetime | None,
    now: datetime,
    *,
    limit: int | None = None,
) -> list[datetime]:
    """The fire times t with last_success < t <= now, the most recent ``limit`` (oldest first).

    ``limit=None`` uses :func:`default_catch_up_limit`. A job that never succeeded
    (``last_success=None``) gets only the single most recent fire time: history is not replayed.
    """
    trigger = parse_schedule(expression, timezone)
    return _missed(trigger, last_success, _utc(now, "now"), limit)


# --- the scheduler -------------------------------------------------------------------------


def _wall_clock() -> datetime:
    return datetime.now(UTC)


_log = structlog.get_logger("hostmeter.scheduler")


class LocalScheduler:
    """Runs registry jobs on their schedules in this process (``hostmeter scheduler``).

    ``jobs`` maps names to registry entries (:data:`jobs.registry.JOBS`); every schedule is
    parsed here, so a bad one fails before anything runs. ``fire`` runs one job for one
    scheduled time; ``last_success`` tells catch-up where to resume; ``now`` is the clock for
    catch-up and for the scheduled time of each fire. ``trigger_factory`` replaces
    :func:`parse_schedule` (tests use second-level triggers). ``retry`` runs the retry pass
    (after catch-up, then every ``retry_interval``).
    """

    def __init__(
        self,
        jobs: Mapping[str, ScheduledJob],
        *,
        fire: Fire,
        last_success: LastSuccess,
        now: Clock = _wall_clock,
        misfire_grace_time: int = DEFAULT_MISFIRE_GRACE_TIME,
        catch_up_limit: int | None = None,
        trigger_factory: TriggerFactory = parse_schedule,
        retry: Callable[[], object] | None = None,
        retry_interval: timedelta = DEFAULT_RETRY_INTERVAL,
    ) -> None:
        self._fire = fire
        self._retry = retry
        self._retry_interval = retry_interval
        self._last_success = last_success
        self._now = now
        self._catch_up_limit = catch_up_limit
        self._triggers: dict[str, BaseTrigger] = {
            spec.name: trigger_factory(spec.schedule, spec.timezone) for spec in jobs.values()
        }
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": misfire_grace_time,
            },
        )
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    @property
    def running(self) -> bool:
        """Whether APScheduler is running (between :meth:`start` and :meth:`shutdown`)."""
        return bool(self._scheduler.running)

    @property
    def apscheduler(self) -> Any:
        """The underlying ``BackgroundScheduler`` (to inspect its jobs)."""
        return self._scheduler

    def _clock(self) -> datetime:
        return _utc(self._now(), "now()")

    def missed(self, now: datetime | None = None) -> list[Firing]:
        """Every job's missed fire times at ``now`` (default: the clock), oldest first."""
        at = self._clock() if now is None else _utc(now, "now")
        order = {name: i for i, name in enumerate(self._triggers)}
        due = [
            Firing(job=name, scheduled_time=t, trigger=TRIGGER_CATCH_UP)
            for name, trigger in self._triggers.items()
            for t in _missed(trigger, self._last_success(name), at, self._catch_up_limit)
        ]
        return sorted(due, key=lambda f: (f.scheduled_time, order[f.job]))

    def catch_up(self, now: datetime | None = None) -> list[Firing]:
        """Fire every missed fire time (trigger ``"catch-up"``), oldest first across jobs.

        A job whose ``fire`` raises is logged (``catch_up_failed``) and gets no more catch-up
        fires this time; the other jobs go on. Returns the firings that completed.
        """
        done: list[Firing] = []
        failed: set[str] = set()
        for firing in self.missed(now):
            if firing.job in failed:
                continue
            if self._call(firing, "catch_up_fired", "catch_up_failed"):
                done.append(firing)
            else:
                failed.add(firing.job)
        return done

    def fire_due(self, name: str) -> Firing | None:
        """Fire ``name`` for its latest fire time at or before now (what APScheduler calls)."""
        latest = _latest_fire_times(self._triggers[name], None, self._clock(), 1)
        if not latest:
            _log.warning("job_not_due", job=name)
            return None
        firing = Firing(job=name, scheduled_time=latest[0], trigger=TRIGGER_SCHEDULE)
        return firing if self._call(firing, "job_fired", "job_fire_failed") else None

    def retry_pass(self) -> bool:
        """Run the retry pass once (if there is one); a failure is logged, never raised."""
        if self._retry is None:
            return False
        _log.info("retry_pass_started")
        try:
            self._retry()
        except Exception as exc:  # a failing retry pass must not stop the scheduler
            _log.error("retry_pass_failed", error=describe_error(exc), exc_info=True)
            return False
        return True

    def _call(self, firing: Firing, fired: str, failed: str) -> bool:
        fields = {
            "job": firing.job,
            "scheduled_time": firing.scheduled_time.isoformat(),
            "trigger": firing.trigger,
        }
        _log.info(fired, **fields)
        try:
            self._fire(firing.job, firing.scheduled_time, firing.trigger)
        except Exception as exc:  # one job's failure must not stop the scheduler
            _log.error(failed, error=describe_error(exc), exc_info=True, **fields)
            return False
        return True

    def start(self) -> None:
        """Catch up, then start APScheduler with one job per registry entry.

        Each APScheduler job's first run is the first fire time after the instant catch-up
        looked at, so a fire time that falls while catching up is run by APScheduler (within
        the misfire grace time), not lost between the two.
        """
        cutoff = self._clock()
        self.catch_up(cutoff)
        if self._retry is not None:
            self.retry_pass()
            self._scheduler.add_job(
                self.retry_pass, trigger=IntervalTrigger(
                    seconds=self._retry_interval.total_seconds(), timezone=UTC),
                id=RETRY_JOB_ID, name=RETRY_JOB_ID, replace_existing=True)
        for name, trigger in self._triggers.items():
            upcoming = trigger.get_next_fire_time(None, cutoff + _TICK)
            self._scheduler.add_job(
                self.fire_due,
                trigger=trigger,
                args=(name,),
                id=name,
                name=name,
                next_run_time=upcoming,
                replace_existing=True,
            )
        self._scheduler.start()
        _log.info(
            "scheduler_started",
            jobs=sorted(self._triggers),
            next_run_times={j.id: _iso(j.next_run_time) for j in self._scheduler.get_jobs()},
        )

    def shutdown(self, *, reason: str = "shutdown") -> None:
        """Stop APScheduler, waiting for running fires to finish."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        _log.info("scheduler_stopped", reason=reason)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.put(signum)  # SimpleQueue.put is reentrant: safe in a signal handler

    def run_forever(self, *, poll_interval: float = 0.5) -> int:
        """Start, block until SIGTERM or SIGINT, shut down cleanly; returns the exit code 0.

        Must run in the main thread (it installs the signal handlers). The previous handlers
        are restored before waiting for running fires, so a second signal stops at once. The
        wait polls every ``poll_interval`` seconds: a signal delivered to another thread runs
        its Python handler only when the main thread next runs Python code.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("run_forever() must run in the main thread (signal handlers)")
        previous = _install({signal.SIGTERM, signal.SIGINT}, self._on_signal)
        try:
            self.start()
            signum = self._wait_for_signal(poll_interval)
        finally:
            _restore(previous)
        self.shutdown(reason=signal.Signals(signum).name)
        return 0

    def _wait_for_signal(self, poll_interval: float) -> int:
        while True:
            try:
                return self._signals.get(timeout=poll_interval)
            except queue.Empty:
                continue


_Handler = Callable[[int, FrameType | None], Any] | int | None


def _install(
    signums: Iterable[signal.Signals], handler: _Handler
) -> dict[signal.Signals, _Handler]:
    return {s: signal.signal(s, handler) for s in signums}


def _restore(previous: Mapping[signal.Signals, _Handler]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None
