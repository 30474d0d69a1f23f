"""The runner: at-least-once triggers in, exactly one effective run per key out.

A trigger names a job, a scheduled time and a shard. The job's key time (the normalized start
of its window) plus the shard make the ledger key. Under the key's lock (see
:mod:`jobs.runtime.locks`):

- the key already succeeded → a ``skipped`` row, exit 0 (unless ``force``); a backfill always
  runs, and its success never makes a scheduled trigger of the same key skip (a backfill's
  window is not the scheduled window);
- a ``running`` row is left over → its process died (we hold the lock): it becomes ``failed``
  (``abandoned``) and this trigger retries;
- otherwise a ``running`` row is written, the job runs, and the row gets its final status,
  counts and error.

A second trigger for a key that is running waits for the lock (``wait_s``) and then, finding the
first run's success, records ``skipped``; two runs of one key never overlap.

A run killed mid-way (SIGKILL, an OOM kill, an ECS task stopped by a deploy) leaves a
``running`` row and frees its lock. Nothing else may depend on the next trigger of the same key
(a monthly job's next trigger is next month's key), so :func:`reap_abandoned` finds such rows —
``running``, and the key's lock free — and marks them ``failed``; :func:`failed_keys` reaps
first, so ``--retry-failed``, ``hostmeter retry-failed`` (scheduled on AWS) and the local
scheduler's retry pass all run those keys again, each at most ``max_attempts`` times when given.
A trigger lost before it left any row (never delivered, or its task killed while starting) is
found by :func:`lost_triggers`, the same catch-up the local scheduler does on start.
Every run also records a ``deadline`` (its start plus the job's ``max_runtime``): a run still
``running`` after it is overdue (:func:`overdue_runs`), which the job metrics export and an
alert watches.
"""

from __future__ import annotations

import os
import socket
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine

from jobs import registry
from jobs.runtime.context import JobContext, new_run_id, run_job
from jobs.runtime.errors import BadTrigger
from jobs.runtime.ledger import job_runs
from jobs.runtime.locks import DEFAULT_WAIT_S, key_lock
from metering.db import reading
from metering.display import quote_name
from metering.settings import Settings
from metering.timeutil import period_of

__all__ = [
    "RunOutcome",
    "RunRequest",
    "Shard",
    "execute",
    "failed_keys",
    "last_success",
    "list_runs",
    "lost_triggers",
    "overdue_runs",
    "parse_shard",
    "reap_abandoned",
    "retry_failed",
]

log = structlog.get_logger("hostmeter.runner")


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): the tenants whose stable hash falls on it."""

    index: int = 0
    count: int = 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, tenant: str) -> bool:
        return zlib.crc32(tenant.encode()) % self.count == self.index


def parse_shard(text: str) -> Shard:
    """``I/N`` with ``0 <= I < N`` → :class:`Shard`; anything else is bad input."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise BadTrigger(f"shard {quote_name(text)} is not I/N (e.g. 0/4)", shard=text) from None
    if not (n >= 1 and 0 <= i < n):
        raise BadTrigger(f"shard {quote_name(text)}: need 0 <= I < N", shard=text)
    return Shard(i, n)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRequest:
    """One delivery of a trigger."""

    job: str
    scheduled_time: datetime
    trigger: str = "manual"
    shard: Shard = Shard()
    force: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOutcome:
    """What a trigger ended as (also the ledger row's content)."""

    run_id: str
    job: str
    logical_time: datetime
    scheduled_time: datetime
    shard: str
    trigger: str
    attempt: int
    status: str
    counts: dict[str, Any]
    error: str | None = None
    exception: BaseException | None = None

    @property
    def exit_code(self) -> int:
        return 0 if self.status in ("succeeded", "skipped") else 1

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "job": self.job,
                "logical_time": self.logical_time.isoformat(),
                "scheduled_time": self.scheduled_time.isoformat(), "shard": self.shard,
                "trigger": self.trigger, "attempt": self.attempt, "status": self.status,
                "counts": self.counts, "error": self.error}


def _now() -> datetime:
    return datetime.now(UTC)


def _identity() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def _lock_key(job: str, key_time: datetime, shard: str) -> str:
    """The key lock's name. UTC, so that it reads the same from the trigger's time (a monthly
    key is a Tokyo midnight) and from the ledger (which stores UTC)."""
    return f"{job}|{key_time.astimezone(UTC).isoformat()}|{shard}"


def execute(
    engine: Engine,
    settings: Settings,
    req: RunRequest,
    *,
    wait_s: float = DEFAULT_WAIT_S,
    clock: Callable[[], datetime] = _now,
    progress: Callable[[int, int], None] | None = None,
) -> RunOutcome:
    """Run ``req`` at most once per key, recording every attempt in the ledger."""
    spec = registry.get(req.job)
    partial_work = sorted(k for k in ("dry_run", "tenants") if req.options.get(k))
    if partial_work:
        raise BadTrigger(f"{', '.join(partial_work)} runs are operator checks, not the run of a "
                         "key: run them without the ledger", job=spec.name)
    if req.shard.count > 1 and not spec.shardable:
        raise BadTrigger(f"job {spec.name} works on all tenants at once and cannot be sharded",
                         job=spec.name)
    key_time = spec.key_time(req.scheduled_time, settings.zone, req.options)
    shard = str(req.shard)
    key = _lock_key(spec.name, key_time, shard)
    run_id = new_run_id()
    host, pid = _identity()
    base = dict(run_id=run_id, job=spec.name, logical_time=key_time,
                scheduled_time=req.scheduled_time, shard=shard, trigger=req.trigger, host=host,
                pid=pid)

    with key_lock(engine, key, wait_s=wait_s) as got:
        if not got:
            return _record_skip(engine, base, clock, attempt=0,
                                reason=f"another run of this key held its lock for {wait_s:g}s")
        with engine.begin() as conn:
            rows = conn.execute(
                sa.select(job_runs.c.run_id, job_runs.c.status, job_runs.c.trigger,
                          job_runs.c.host, job_runs.c.pid)
                .where(job_runs.c.job == spec.name, job_runs.c.logical_time == key_time,
                       job_runs.c.shard == shard)
            ).all()
            attempts = sum(1 for r in rows if r.status != "skipped")
            done = any(r.status == "succeeded" and r.trigger != "backfill" for r in rows)
            if not req.force and req.trigger != "backfill" and done:
                conn.execute(sa.insert(job_runs).values(
                    **base, attempt=attempts, status="skipped", counts={},
                    error="already succeeded", started_at=clock(), finished_at=clock()))
                log.info("run_skipped", job=spec.name, logical_time=key_time.isoformat(),
                         shard=shard, reason="already succeeded")
                return RunOutcome(**_outcome(base), attempt=attempts, status="skipped",
                                  counts={}, error="already succeeded")
            for r in rows:
                if r.status == "running":
                    conn.execute(
                        sa.update(job_runs).where(job_runs.c.run_id == r.run_id).values(
                            status="failed", finished_at=clock(),
                            error=f"abandoned: process {r.pid} on {r.host} died mid-run"))
                    log.warning("run_abandoned", job=spec.name, run_id=r.run_id,
                                logical_time=key_time.isoformat(), shard=shard)
            started = clock()
            conn.execute(sa.insert(job_runs).values(
                **base, attempt=attempts + 1, status="running", counts={}, error=None,
                started_at=started, deadline=started + spec.max_runtime))

        options = dict(req.options)
        if spec.shardable:
            options["shard"] = req.shard
        ctx = JobContext(engine=engine, settings=settings, run_id=run_id, trigger=req.trigger,
                         clock=clock, progress=progress)
        result = run_job(spec.name, spec.run, ctx, req.scheduled_time, **options)
        counts = _jsonable(result.counts)
        with engine.begin() as conn:
            conn.execute(sa.update(job_runs).where(job_runs.c.run_id == run_id).values(
                status=result.status, counts=counts, error=result.error, finished_at=clock()))
    return RunOutcome(**_outcome(base), attempt=attempts + 1, status=result.status,
                      counts=counts, error=result.error, exception=result.exception)


def _outcome(base: dict[str, Any]) -> dict[str, Any]:
    return {k: base[k] for k in ("run_id", "job", "logical_time", "scheduled_time", "shard",
                                 "trigger")}


def _record_skip(engine: Engine, base: dict[str, Any], clock: Callable[[], datetime], *,
                 attempt: int, reason: str) -> RunOutcome:
    with engine.begin() as conn:
        conn.execute(sa.insert(job_runs).values(**base, attempt=attempt, status="skipped",
                                                counts={}, error=reason, started_at=clock(),
                                                finished_at=clock()))
    log.info("run_skipped", job=base["job"], logical_time=base["logical_time"].isoformat(),
             shard=base["shard"], reason=reason)
    return RunOutcome(**_outcome(base), attempt=attempt, status="skipped", counts={},
                      error=reason)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def reap_abandoned(engine: Engine, *, job: str | None = None,
                   clock: Callable[[], datetime] = _now) -> int:
    """Mark ``failed`` every ``running`` row (of ``job``, or of every job) whose process is gone:
    its key's lock is free. A live run holds its lock, so it is never touched; a run that
    finishes meanwhile is no longer ``running`` and is left as it ended. Returns how many rows
    were marked."""
    q = (sa.select(job_runs.c.run_id, job_runs.c.job, job_runs.c.logical_time,
                   job_runs.c.shard, job_runs.c.host, job_runs.c.pid)
         .where(job_runs.c.status == "running"))
    if job is not None:
        q = q.where(job_runs.c.job == job)
    with reading(engine) as conn:
        rows = conn.execute(q).all()
    reaped = 0
    for r in rows:
        with key_lock(engine, _lock_key(r.job, r.logical_time, r.shard), wait_s=0) as free:
            if not free:  # its process holds the lock: alive
                continue
            with engine.begin() as conn:
                reaped += conn.execute(
                    sa.update(job_runs)
                    .where(job_runs.c.run_id == r.run_id, job_runs.c.status == "running")
                    .values(status="failed", finished_at=clock(),
                            error=f"abandoned: process {r.pid} on {r.host} died mid-run")
                ).rowcount
        log.warning("run_abandoned", job=r.job, run_id=r.run_id,
                    logical_time=r.logical_time.isoformat(), shard=r.shard, pid=r.pid,
                    host=r.host)
    return reaped


def failed_keys(engine: Engine, job: str, zone: ZoneInfo, *,
                max_attempts: int | None = None) -> list[RunRequest]:
    """A retry request for every key of ``job`` whose latest attempt failed, ended partial or
    was abandoned (and that never succeeded): what ``hostmeter run JOB --retry-failed`` runs.

    Abandoned runs are reaped first (:func:`reap_abandoned`). With ``max_attempts``, a key that
    has been attempted that many times is left alone (and logged ``retries_exhausted``): a key
    that fails for good must not be retried forever; its failed runs stay in the ledger and
    alert.
    """
    spec = registry.get(job)
    reap_abandoned(engine, job=spec.name)
    with reading(engine) as conn:
        rows = conn.execute(
            sa.select(job_runs.c.logical_time, job_runs.c.shard, job_runs.c.status,
                      job_runs.c.scheduled_time, job_runs.c.trigger)
            .where(job_runs.c.job == spec.name, job_runs.c.status != "skipped")
            .order_by(job_runs.c.started_at, job_runs.c.run_id)
        ).all()
    latest: dict[tuple[datetime, str], Any] = {}
    attempts: dict[tuple[datetime, str], int] = {}
    succeeded: set[tuple[datetime, str]] = set()
    for r in rows:
        if r.trigger == "backfill":
            continue
        key = (r.logical_time, r.shard)
        latest[key] = r
        attempts[key] = attempts.get(key, 0) + 1
        if r.status == "succeeded":
            succeeded.add(key)
    out = []
    for key, r in sorted(latest.items()):
        if r.status not in ("failed", "partial") or key in succeeded:
            continue
        if max_attempts is not None and attempts[key] >= max_attempts:
            log.warning("retries_exhausted", job=spec.name, logical_time=key[0].isoformat(),
                        shard=key[1], attempts=attempts[key])
            continue
        options: dict[str, Any] = {}
        if "period" in spec.options:
            options["period"] = period_of(r.logical_time, zone)
        out.append(RunRequest(job=spec.name, scheduled_time=r.scheduled_time,
                              trigger="retry", shard=parse_shard(r.shard), options=options))
    return out


CATCH_UP_GRACE = timedelta(minutes=10)
"""A fire time younger than this may still be starting (a task pulling its image, importing):
the retry pass leaves it to its own trigger."""


def lost_triggers(engine: Engine, job: str, zone: ZoneInfo, now: datetime) -> list[RunRequest]:
    """Catch-up requests for the fire times of ``job`` since its last success (bounded as the
    local scheduler bounds its catch-up) that left no trace in the ledger at all: a trigger that
    never arrived, or a task killed before it recorded its run. Only jobs whose window no other
    run covers (``catch_up``)."""
    from jobs.triggers.scheduler import missed_fire_times

    spec = registry.get(job)
    if not spec.catch_up:
        return []
    times = missed_fire_times(spec.schedule, spec.timezone, last_success(engine, spec.name),
                              now - CATCH_UP_GRACE)
    if not times:
        return []
    with reading(engine) as conn:
        seen = set(conn.execute(sa.select(job_runs.c.logical_time).where(
            job_runs.c.job == spec.name)).scalars().all())
    return [RunRequest(job=spec.name, scheduled_time=t, trigger="catch-up") for t in times
            if spec.key_time(t, zone, {}) not in seen]


def retry_failed(
    engine: Engine,
    settings: Settings,
    *,
    jobs: list[str] | None = None,
    max_attempts: int | None = None,
    wait_s: float = DEFAULT_WAIT_S,
    clock: Callable[[], datetime] = _now,
    catch_up: bool = True,
) -> list[RunOutcome]:
    """The retry pass of ``hostmeter retry-failed`` and of the local scheduler: for ``jobs``
    (default: every registered job), run again every failed, partial or abandoned key
    (:func:`failed_keys`), then, with ``catch_up``, every lost trigger (:func:`lost_triggers`)."""
    outcomes: list[RunOutcome] = []
    for name in jobs if jobs is not None else list(registry.JOBS):
        requests = failed_keys(engine, name, settings.zone, max_attempts=max_attempts)
        if catch_up:
            requests += lost_triggers(engine, name, settings.zone, clock())
        for req in requests:
            outcomes.append(execute(engine, settings, req, wait_s=wait_s, clock=clock))
    return outcomes


def overdue_runs(engine: Engine, now: datetime) -> list[dict[str, Any]]:
    """The runs still ``running`` after their deadline (alive or not), oldest first."""
    q = (sa.select(job_runs).where(job_runs.c.status == "running",
                                   job_runs.c.deadline < now)
         .order_by(job_runs.c.started_at))
    with reading(engine) as conn:
        return [dict(r) for r in conn.execute(q).mappings().all()]


def last_success(engine: Engine, job: str) -> datetime | None:
    """The scheduled time of the job's latest successful run (any shard, not a backfill), or
    None: where the local scheduler's catch-up starts from."""
    with reading(engine) as conn:
        return conn.execute(
            sa.select(sa.func.max(job_runs.c.scheduled_time)).where(
                job_runs.c.job == job, job_runs.c.status == "succeeded",
                job_runs.c.trigger != "backfill")
        ).scalar_one_or_none()


def list_runs(engine: Engine, *, job: str | None = None, status: str | None = None,
              limit: int = 50, overdue_at: datetime | None = None) -> list[dict[str, Any]]:
    """The ledger, newest first; with ``overdue_at``, only the runs still ``running`` past
    their deadline at that instant."""
    q = sa.select(job_runs).order_by(job_runs.c.started_at.desc(), job_runs.c.run_id)
    if job:
        q = q.where(job_runs.c.job == job)
    if status:
        q = q.where(job_runs.c.status == status)
    if overdue_at is not None:
        q = q.where(job_runs.c.status == "running", job_runs.c.deadline < overdue_at)
    with reading(engine) as conn:
        rows = conn.execute(q.limit(limit)).mappings().all()
    return [
        {**dict(r), "logical_time": r["logical_time"].isoformat(),
         "scheduled_time": r["scheduled_time"].isoformat(),
         "started_at": r["started_at"].isoformat(),
         "finished_at": r["finished_at"].isoformat() if r["finished_at"] else None,
         "deadline": r["deadline"].isoformat() if r["deadline"] else None}
        for r in rows
    ]
