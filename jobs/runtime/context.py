"""Running one job: the context a job body receives and the telemetry around it.

A job body is ``run(ctx, logical_time, **options) -> counts``. It derives its window from
``logical_time`` and never reads the clock; :class:`JobContext` carries everything else.
:func:`run_job` binds ``job``, ``run_id`` and ``logical_time`` into every log event, logs
``job_started`` and exactly one ``job_finished`` (status, counts, ``duration_s``).

A failed run's ``error`` (in ``job_finished``, the run ledger and the CLI's one-line error) is
:func:`metering.db.describe_error`: the exception's class and the first line of its reason,
cut short, password hidden — never SQLAlchemy's SQL text or bound parameters.
"""

from __future__ import annotations

import getpass
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.engine import Engine

from metering.db import describe_error
from metering.settings import Settings

__all__ = ["JobContext", "JobResult", "actor", "new_run_id", "run_job"]


def actor() -> str:
    """``user@host`` of whoever runs this process (recorded on every billing run, and on
    every budget alert and webhook endpoint set by hand)."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def new_run_id() -> str:
    return uuid.uuid4().hex


def _wall_clock() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobContext:
    """What a job body may use: the database, settings, its run id, and a clock for stamps.

    ``clock`` is only for recording *when* something was written (audit columns); windows come
    from the logical time alone.
    """

    engine: Engine
    settings: Settings
    run_id: str = field(default_factory=new_run_id)
    trigger: str = "manual"
    clock: Callable[[], datetime] = _wall_clock
    progress: Callable[[int, int], None] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobResult:
    """The outcome of one run, as logged in ``job_finished``."""

    job: str
    run_id: str
    logical_time: datetime
    status: str
    counts: dict[str, Any]
    duration_s: float
    error: str | None = None
    exception: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("succeeded", "skipped")


def run_job(
    name: str,
    body: Callable[..., dict[str, Any]],
    ctx: JobContext,
    logical_time: datetime,
    **options: Any,
) -> JobResult:
    """Run ``body`` with job telemetry; exceptions become a ``failed`` result, never escape."""
    log = structlog.get_logger("hostmeter.job")
    with structlog.contextvars.bound_contextvars(
        job=name, run_id=ctx.run_id, logical_time=logical_time.isoformat()
    ):
        log.info("job_started", trigger=ctx.trigger,
                 **{k: _show(v) for k, v in options.items() if k not in _NOT_LOGGED})
        started = time.perf_counter()
        counts: dict[str, Any] = {}
        error: str | None = None
        failure: BaseException | None = None
        status = "succeeded"
        try:
            counts = dict(body(ctx, logical_time, **options))  # not a mapping: a failed run
            status = str(counts.pop("status", "succeeded"))
        except Exception as exc:  # the run is recorded as failed; the caller decides the exit
            status = "failed"
            failure = exc
            error = describe_error(exc, url=ctx.engine.url)
            log.error("job_error", error=error, exc_info=True)
        duration = round(time.perf_counter() - started, 6)
        log.info("job_finished", status=status, duration_s=duration, error=error, **counts)
    return JobResult(
        job=name,
        run_id=ctx.run_id,
        logical_time=logical_time,
        status=status,
        counts=counts,
        duration_s=duration,
        error=error,
        exception=failure,
    )


_NOT_LOGGED = frozenset({"outcomes", "logs_client", "transport"})  # handed in, not options


def _show(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple) and value and isinstance(value[0], datetime):
        return f"{len(value)} hours"
    return value
