"""``deliver-webhooks``: POST the outbox's events to their endpoints, signed, in order, retried.

Every minute. A run takes the queue's lock (:data:`QUEUE_LOCK`: a PostgreSQL advisory lock, on
SQLite a ``flock`` on a file beside the database; an in-memory SQLite database has a
process-local lock), so two runs at once never send the same delivery concurrently: the second
ends ``skipped`` at once. Then, with ``now`` the context's clock at the start:

1. read the **head** of every (endpoint, tenant) pair, its oldest pending delivery, that is due
   at ``now`` (:func:`billing.webhooks.due_heads`); a pair whose head is waiting sends nothing;
2. POST each head (round robin over pairs): ``outbox.body_bytes(payload)`` with the headers of
   :func:`request_headers`, signed with the endpoint's secret, no redirects followed,
   ``HOSTMETER_WEBHOOK_TIMEOUT`` for each phase of the request;
3. commit the attempt's result at once (:func:`billing.webhooks.record_attempt`); delivered →
   the pair's next delivery, if due, joins the back of the round; a failure holds the pair
   until its next attempt (:mod:`billing.webhooks` has the retry policy: backoff, Retry-After,
   the retry window, ``dead``);
4. a timeout, a connection failure, 429 or 503 take the whole endpoint out of this run: a
   hanging receiver costs one timeout per run, not one per tenant;
5. no attempt starts after ``HOSTMETER_WEBHOOK_RUN_SECONDS``: a run ends within that plus one
   timeout; what is left waits for the next run.

Delivery is **at least once**: a POST whose result's commit is lost (the process killed after
the receiver answered) is sent again by the next run, with the same event id, which is why a
receiver deduplicates on ``Hostmeter-Event-Id``. Failed attempts are logged
(``webhook_attempt_failed``: delivery, event, endpoint, tenant, status or error; never the secret
or the signature).

The run's counts: ``delivered``, ``retried`` (failed, to be tried again), ``dead``,
``attempts``, ``endpoints_skipped``, ``pending`` and ``pending_due`` left, and
``oldest_pending_age_s``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from billing import outbox
from billing import webhooks as wh
from jobs.runtime.context import JobContext
from jobs.runtime.locks import key_lock
from jobs.runtime.logconfig import register_secrets
from metering.db import reading
from metering.display import one_line

if TYPE_CHECKING:
    import httpx

__all__ = ["QUEUE_LOCK", "USER_AGENT", "Attempt", "attempt", "request_headers", "run"]

QUEUE_LOCK = "deliver-webhooks|queue"
"""The lock every run holds while it sends (whatever its minute)."""

_SNIPPET = 200  # characters of a refusing receiver's answer kept in last_error


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hostmeter")
    except PackageNotFoundError:
        return "0"


USER_AGENT = f"hostmeter-webhooks/{_version()}"

log = structlog.get_logger("hostmeter.webhooks")


def request_headers(delivery: wh.Delivery, body: bytes, timestamp: int) -> dict[str, str]:
    """The headers of one POST of ``delivery`` made at unix time ``timestamp``."""
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Idempotency-Key": delivery.event_id,
        "Hostmeter-Event-Id": delivery.event_id,
        "Hostmeter-Event-Type": delivery.type,
        "Hostmeter-Timestamp": str(timestamp),
        "Hostmeter-Delivery-Attempt": str(delivery.attempts + 1),
        outbox.SIGNATURE_HEADER: outbox.sign(delivery.secret, timestamp, body),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """What one POST came to."""

    outcome: wh.Outcome
    status: int | None
    error: str | None
    next_attempt_at: datetime | None
    skip_endpoint: str | None
    """Why the rest of the run leaves this endpoint alone (``None``: it does not)."""


def _snippet(response: httpx.Response) -> str:
    """The start of a refusing receiver's answer (one chunk read at most)."""
    import httpx

    try:
        chunk = next(response.iter_bytes(), b"")
    except httpx.HTTPError:
        return ""
    return one_line(chunk[:_SNIPPET].decode("utf-8", "replace"), limit=_SNIPPET)


def attempt(client: httpx.Client, delivery: wh.Delivery, *, at: datetime,
            window: timedelta, timeout_s: float) -> Attempt:
    """POST ``delivery`` once at ``at`` and classify the answer (no database here)."""
    import httpx

    body = outbox.body_bytes(delivery.payload)
    headers = request_headers(delivery, body, int(at.timestamp()))
    status: int | None = None
    error: str | None = None
    retry_after: timedelta | None = None
    skip: str | None = None
    try:
        with client.stream("POST", delivery.url, content=body, headers=headers) as response:
            status = response.status_code
            if not 200 <= status < 300:
                snippet = _snippet(response)
                error = f"HTTP {status}" + (f": {snippet}" if snippet else "")
            if status in (429, 503):
                retry_after = wh.parse_retry_after(response.headers.get("Retry-After"), at)
                skip = f"HTTP {status}"
    except httpx.TimeoutException as exc:
        error = f"timeout after {timeout_s:g}s ({type(exc).__name__})"
        skip = "timeout"
    except (httpx.TransportError, httpx.InvalidURL) as exc:
        reason = str(exc).strip()
        error = one_line(f"connection failed ({type(exc).__name__}"
                         + (f": {reason})" if reason else ")"), limit=300)
        skip = "connection failed"
    outcome = wh.outcome_of(status)
    next_at = None
    if outcome == "retry":
        next_at = wh.retry_at(attempts=delivery.attempts + 1, at=at,
                              created_at=delivery.created_at, window=window,
                              retry_after=retry_after)
        if next_at is None:
            outcome = "dead"
    return Attempt(outcome=outcome, status=status, error=error, next_attempt_at=next_at,
                   skip_endpoint=skip)


def run(ctx: JobContext, logical_time: datetime, *,
        transport: httpx.BaseTransport | None = None) -> dict[str, Any]:
    """Send what is due (see the module's docstring). ``transport`` replaces the network (tests
    pass an ``httpx.MockTransport``)."""
    with key_lock(ctx.engine, QUEUE_LOCK, wait_s=0) as got:
        if not got:
            log.info("webhook_queue_busy", reason="another deliver-webhooks run is sending")
            return {"status": "skipped", "reason": "another run holds the queue"}
        return _deliver(ctx, transport)


def _deliver(ctx: JobContext, transport: httpx.BaseTransport | None) -> dict[str, Any]:
    import httpx

    settings = ctx.settings
    window = timedelta(hours=settings.webhook_retry_hours)
    started = time.monotonic()
    now = ctx.clock()
    counts = {"delivered": 0, "retried": 0, "dead": 0, "attempts": 0}
    skipped: dict[int, str] = {}
    tried: set[tuple[int, int]] = set()  # (delivery, attempts) sent in this run
    out_of_time = False
    client = httpx.Client(transport=transport, follow_redirects=False,
                          timeout=httpx.Timeout(settings.webhook_timeout_s))
    with client:
        while not out_of_time:
            with reading(ctx.engine) as conn:
                heads = wh.due_heads(conn, now=now, skip_endpoints=sorted(skipped))
            round_ = deque(d for d in heads if (d.id, d.attempts) not in tried)
            if not round_:
                break
            register_secrets({d.secret for d in round_})  # once a round, not once a POST
            while round_:
                if time.monotonic() - started >= settings.webhook_run_s:
                    out_of_time = True
                    break
                d = round_.popleft()
                if d.endpoint_id in skipped:
                    continue
                tried.add((d.id, d.attempts))
                at = ctx.clock()
                result = attempt(client, d, at=at, window=window,
                                 timeout_s=settings.webhook_timeout_s)
                with ctx.engine.begin() as conn:
                    recorded = wh.record_attempt(
                        conn, d, at=at, outcome=result.outcome, status=result.status,
                        error=result.error, next_attempt_at=result.next_attempt_at)
                counts["attempts"] += 1
                _log_attempt(d, result, recorded)
                if not recorded:
                    continue
                counts[{"delivered": "delivered", "retry": "retried",
                        "dead": "dead"}[result.outcome]] += 1
                if result.skip_endpoint and d.endpoint_id not in skipped:
                    skipped[d.endpoint_id] = result.skip_endpoint
                    log.warning("webhook_endpoint_skipped", endpoint=d.endpoint_id,
                                reason=result.skip_endpoint)
                if result.outcome != "retry":  # delivered or dead: the pair's next may go
                    with reading(ctx.engine) as conn:
                        following = wh.next_of_pair(conn, *d.pair)
                    if (following is not None and following.next_attempt_at is not None
                            and following.next_attempt_at <= now):
                        round_.append(following)
    with reading(ctx.engine) as conn:
        stats = wh.queue_stats(conn, now=ctx.clock())
    if out_of_time:
        log.warning("webhook_run_out_of_time", budget_s=settings.webhook_run_s,
                    pending_due=stats.due)
    return {**counts, "endpoints_skipped": len(skipped), "pending": stats.pending,
            "pending_due": stats.due, "oldest_pending_age_s": stats.oldest_age_s or 0.0,
            "out_of_time": out_of_time}


def _log_attempt(d: wh.Delivery, result: Attempt, recorded: bool) -> None:
    fields: dict[str, Any] = {"delivery": d.id, "event_id": d.event_id, "event_type": d.type,
                              "endpoint": d.endpoint_id, "tenant": d.tenant,
                              "attempt": d.attempts + 1, "http_status": result.status}
    if not recorded:
        log.info("webhook_attempt_superseded", **fields,
                 reason="the delivery was changed meanwhile (redelivered or endpoint removed)")
    elif result.outcome == "delivered":
        log.info("webhook_delivered", **fields)
    else:
        next_at = result.next_attempt_at
        log.warning("webhook_attempt_failed", **fields, error=result.error,
                    outcome=result.outcome,
                    next_attempt_at=None if next_at is None else next_at.isoformat())
