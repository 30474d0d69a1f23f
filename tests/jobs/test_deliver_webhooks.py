"""``deliver-webhooks``: signed POSTs, in order per (endpoint, tenant), retried, then dead.

Against an injected ``httpx.MockTransport``: the exact request (headers, body, signature), no
redirect followed, permanent 4xx dead at once (and unblocking the pair), 5xx holding only its
pair, a timeout taking the endpoint out of the run, Retry-After, the retry window, the run's
time budget, a commit per attempt, the queue lock, nothing secret logged.

Against a real HTTP server on 127.0.0.1 (:class:`jobs.synthetic.receiver.Receiver`) that fails
(500, 429), hangs past the client's timeout and recovers: every event arrives at least once,
with the same id on every attempt, in order per tenant, with a valid signature; a hang costs
one timeout per run; a run after everything is delivered sends nothing; a POST whose result was
never committed is sent again (at least once). Time is driven through the job context's clock
(and the receiver's), never by sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from billing import notices as n
from billing import outbox
from billing import webhooks as wh
from jobs import deliver_webhooks
from jobs.runtime.context import JobContext, JobResult, run_job
from jobs.runtime.locks import key_lock
from jobs.synthetic.receiver import Hang, Receiver, Respond
from metering.models import tenants
from metering.settings import Settings

SECRET = "whsec-deliver-test-6f1c2a"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)

    def unix(self) -> float:
        return self.now.timestamp()


def settings(**overrides: Any) -> Settings:
    base = Settings(webhook_timeout_s=0.3, webhook_retry_hours=72, webhook_run_s=30)
    return replace(base, **overrides)


def deliver(engine: Engine, clock: Callable[[], datetime], *, conf: Settings | None = None,
            transport: httpx.BaseTransport | None = None) -> JobResult:
    ctx = JobContext(engine=engine, settings=conf or settings(), clock=clock)
    options = {} if transport is None else {"transport": transport}
    return run_job("deliver-webhooks", deliver_webhooks.run, ctx, clock(), **options)


def seed(engine: Engine, urls: dict[str | None, str], events: dict[str, int], *,
         now: datetime) -> None:
    """Tenants, endpoints (tenant key or None for global → URL), and ``events[t]`` events per
    tenant, written in the order t0, t1, … interleaved across tenants."""
    with engine.begin() as conn:
        ids = {t: conn.execute(sa.insert(tenants).values(key=t).returning(tenants.c.id))
               .scalar_one() for t in events}
        for tenant, url in urls.items():
            wh.add_endpoint(conn, url=url, secret=SECRET, tenant=tenant, now=now,
                            created_by="test")
        batch = [outbox.Event(type="invoice.drafted", tenant=t, tenant_id=ids[t],
                              key=f"{t}:{i}", data={"tenant": t, "seq": i})
                 for i in range(max(events.values())) for t in events if i < events[t]]
        outbox.enqueue(conn, batch, now=now)


def event_ids(tenant: str, count: int) -> list[str]:
    return [outbox.event_id(f"{tenant}:{i}") for i in range(count)]


def statuses(engine: Engine) -> dict[str, list[str]]:
    d, e = n.webhook_deliveries, n.outbox_events
    out: dict[str, list[str]] = {}
    with engine.connect() as conn:
        for r in conn.execute(sa.select(e.c.event_id, d.c.status)
                              .join(e, e.c.id == d.c.event_pk).order_by(d.c.id)):
            out.setdefault(r.event_id, []).append(r.status)
    return out


class Recorder:
    """A MockTransport handler: answers from ``answer(request, n)`` and keeps every request."""

    def __init__(self, answer: Callable[[httpx.Request, int], httpx.Response] | None = None
                 ) -> None:
        self.requests: list[httpx.Request] = []
        self.answer = answer or (lambda request, i: httpx.Response(200))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request, len(self.requests) - 1)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def ids(self, host: str | None = None) -> list[str]:
        return [r.headers["Hostmeter-Event-Id"] for r in self.requests
                if host is None or r.url.host == host]


# --- the request -------------------------------------------------------------------------------


def test_each_post_is_the_stored_body_signed_with_the_event_id(engine: Engine) -> None:
    seed(engine, {"acme": "https://acme.example/hooks"}, {"acme": 2}, now=T0)
    clock = Clock(T0 + timedelta(seconds=5))
    rec = Recorder()
    result = deliver(engine, clock, transport=rec.transport)
    assert result.status == "succeeded", result.error
    assert result.counts | {"oldest_pending_age_s": 0} == {
        "delivered": 2, "retried": 0, "dead": 0, "attempts": 2, "endpoints_skipped": 0,
        "pending": 0, "pending_due": 0, "oldest_pending_age_s": 0, "out_of_time": False}
    assert rec.ids() == event_ids("acme", 2)
    with engine.connect() as conn:
        payloads = {r.event_id: r.payload for r in conn.execute(sa.select(n.outbox_events))}
    for request in rec.requests:
        eid = request.headers["Hostmeter-Event-Id"]
        assert request.method == "POST" and str(request.url) == "https://acme.example/hooks"
        assert request.content == outbox.body_bytes(payloads[eid])
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["Idempotency-Key"] == eid
        assert request.headers["Hostmeter-Event-Type"] == "invoice.drafted"
        assert request.headers["Hostmeter-Timestamp"] == str(int(clock.unix()))
        assert request.headers["User-Agent"].startswith("hostmeter-webhooks/")
        assert request.headers["Hostmeter-Delivery-Attempt"] == "1"
        assert outbox.verify(SECRET, request.headers["Hostmeter-Signature"], request.content,
                             now=int(clock.unix()))
        assert not outbox.verify("wrong", request.headers["Hostmeter-Signature"],
                                 request.content, now=int(clock.unix()))
    assert statuses(engine) == {e: ["delivered"] for e in event_ids("acme", 2)}


def test_a_redirect_is_not_followed_and_is_dead_with_its_status(engine: Engine) -> None:
    seed(engine, {"acme": "https://acme.example/hooks"}, {"acme": 1}, now=T0)
    rec = Recorder(lambda request, i: httpx.Response(
        302, headers={"Location": "https://elsewhere.example/"}))
    result = deliver(engine, Clock(T0), transport=rec.transport)
    assert [r.url.host for r in rec.requests] == ["acme.example"]
    assert result.counts["dead"] == 1
    with engine.connect() as conn:
        [row] = wh.list_deliveries(conn)
    assert (row.status, row.last_status, row.last_error, row.attempts) == (
        "dead", 302, "HTTP 302", 1)


def test_a_refusal_is_dead_at_once_and_the_pair_goes_on(engine: Engine) -> None:
    seed(engine, {"acme": "https://acme.example/hooks"}, {"acme": 3}, now=T0)
    rec = Recorder(lambda request, i: httpx.Response(
        422, text="unknown \x1b[31mfield\n" + "x" * 500) if i == 0 else httpx.Response(204))
    result = deliver(engine, Clock(T0), transport=rec.transport)
    assert rec.ids() == event_ids("acme", 3)  # the next events went in the same run
    assert (result.counts["dead"], result.counts["delivered"]) == (1, 2)
    with engine.connect() as conn:
        dead = wh.list_deliveries(conn, status="dead")
    assert [r.event_id for r in dead] == event_ids("acme", 1)
    error = dead[0].last_error or ""
    assert error.startswith("HTTP 422: unknown ") and "\x1b" not in error and "\n" not in error
    assert len(error) < 260


def test_a_server_error_holds_its_pair_only_until_the_retry(engine: Engine) -> None:
    seed(engine, {None: "https://all.example/hooks"}, {"acme": 2, "globex": 2}, now=T0)
    first_acme = event_ids("acme", 1)[0]
    failing = {first_acme: 1}  # fails once

    def answer(request: httpx.Request, i: int) -> httpx.Response:
        eid = request.headers["Hostmeter-Event-Id"]
        if failing.get(eid, 0) > 0:
            failing[eid] -= 1
            return httpx.Response(500)
        return httpx.Response(200)

    rec = Recorder(answer)
    clock = Clock(T0)
    result = deliver(engine, clock, transport=rec.transport)
    assert sorted(rec.ids()) == sorted([first_acme, *event_ids("globex", 2)])
    assert (result.counts["retried"], result.counts["delivered"]) == (1, 2)
    assert result.counts["endpoints_skipped"] == 0  # a 500 holds the pair, not the endpoint
    clock.advance(seconds=59)
    assert deliver(engine, clock, transport=rec.transport).counts["attempts"] == 0
    clock.advance(seconds=1)
    result = deliver(engine, clock, transport=rec.transport)
    assert rec.ids()[-2:] == event_ids("acme", 2)  # the retry first, then the one held
    assert rec.requests[-2].headers["Hostmeter-Delivery-Attempt"] == "2"
    assert result.counts["delivered"] == 2 and result.counts["pending"] == 0


def test_a_timeout_takes_the_endpoint_out_of_the_run(engine: Engine) -> None:
    seed(engine, {None: "https://slow.example/hooks", "acme": "https://fast.example/hooks"},
         {"acme": 2, "globex": 2, "hooli": 2}, now=T0)

    def answer(request: httpx.Request, i: int) -> httpx.Response:
        if request.url.host == "slow.example":
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(200)

    rec = Recorder(answer)
    clock = Clock(T0)
    with capture_logs() as logs:
        result = deliver(engine, clock, transport=rec.transport)
    assert len(rec.ids("slow.example")) == 1  # one timeout, not one per tenant
    assert rec.ids("fast.example") == event_ids("acme", 2)
    assert result.counts["endpoints_skipped"] == 1 and result.counts["retried"] == 1
    assert result.counts["pending"] == 6 and result.counts["pending_due"] == 5
    [failed] = [e for e in logs if e["event"] == "webhook_attempt_failed"]
    assert failed["error"] == "timeout after 0.3s (ReadTimeout)" and failed["log_level"] == (
        "warning")
    assert failed["outcome"] == "retry" and failed["http_status"] is None
    assert {"delivery", "event_id", "endpoint", "tenant"} <= failed.keys()
    assert [e["reason"] for e in logs if e["event"] == "webhook_endpoint_skipped"] == ["timeout"]


def test_retry_after_on_429_is_honoured_and_skips_the_endpoint(engine: Engine) -> None:
    seed(engine, {None: "https://all.example/hooks"}, {"acme": 1, "globex": 1}, now=T0)
    rec = Recorder(lambda request, i: httpx.Response(429, headers={"Retry-After": "300"}))
    clock = Clock(T0)
    result = deliver(engine, clock, transport=rec.transport)
    assert len(rec.requests) == 1 and result.counts["endpoints_skipped"] == 1
    with engine.connect() as conn:
        [row] = [r for r in wh.list_deliveries(conn) if r.attempts]
    assert row.next_attempt_at == T0 + timedelta(seconds=300) and row.last_status == 429


def test_retries_end_at_the_window_then_dead(engine: Engine) -> None:
    seed(engine, {"acme": "https://acme.example/hooks"}, {"acme": 2}, now=T0)
    rec = Recorder(lambda request, i: httpx.Response(503))
    conf = settings(webhook_retry_hours=1)
    clock = Clock(T0)
    attempts_at = []
    for _ in range(20):
        result = deliver(engine, clock, conf=conf, transport=rec.transport)
        if result.counts["attempts"]:
            attempts_at.append(clock.now - T0)
        if result.counts["dead"]:
            break
        with engine.connect() as conn:
            [head] = wh.due_heads(conn, now=T0 + timedelta(days=1))
        assert head.next_attempt_at is not None
        clock.now = head.next_attempt_at
    minutes = [int(a.total_seconds() // 60) for a in attempts_at]
    assert minutes == [0, 1, 3, 7, 15, 31, 60]  # 1, 2, 4, 8, 16 min, then the window's end
    assert statuses(engine)[event_ids("acme", 1)[0]] == ["dead"]
    # dead unblocks the pair (the 503 took the endpoint out of that run): the next run sends
    # the second event, whose window began at T0 as well, so its first failure is final
    again = deliver(engine, clock, conf=conf, transport=rec.transport)
    assert (again.counts["attempts"], again.counts["dead"]) == (1, 1)
    assert rec.ids() == [event_ids("acme", 1)[0]] * 7 + [event_ids("acme", 2)[1]]


def test_each_attempt_is_committed_before_the_next(engine: Engine) -> None:
    seed(engine, {"acme": "https://acme.example/hooks"}, {"acme": 3}, now=T0)

    def answer(request: httpx.Request, i: int) -> httpx.Response:
        if i == 1:
            raise RuntimeError("the process dies here")
        return httpx.Response(200)

    result = deliver(engine, Clock(T0), transport=Recorder(answer).transport)
    assert result.status == "failed" and "RuntimeError" in (result.error or "")
    first, second, third = event_ids("acme", 3)
    assert statuses(engine) == {first: ["delivered"], second: ["pending"], third: ["pending"]}


def test_a_second_run_at_once_is_skipped_and_sends_nothing(engine: Engine) -> None:
    seed(engine, {"acme": "https://acme.example/hooks"}, {"acme": 1}, now=T0)
    rec = Recorder()
    with key_lock(engine, deliver_webhooks.QUEUE_LOCK) as got:
        assert got
        result = deliver(engine, Clock(T0), transport=rec.transport)
    assert result.status == "skipped" and rec.requests == []
    assert deliver(engine, Clock(T0), transport=rec.transport).counts["delivered"] == 1


def test_a_run_stops_starting_attempts_when_its_time_is_up(engine: Engine) -> None:
    seed(engine, {"acme": "https://acme.example/hooks"}, {"acme": 20}, now=T0)

    def slow(request: httpx.Request, i: int) -> httpx.Response:
        time.sleep(0.1)
        return httpx.Response(200)

    started = time.monotonic()
    result = deliver(engine, Clock(T0), conf=settings(webhook_run_s=1.0),
                     transport=Recorder(slow).transport)
    took = time.monotonic() - started
    assert result.counts["out_of_time"] is True
    assert 5 <= result.counts["delivered"] < 20
    assert result.counts["pending_due"] == 20 - result.counts["delivered"]
    assert took < 2.0


def test_nothing_secret_is_logged(engine: Engine) -> None:
    seed(engine, {"acme": "https://acme.example/hooks"}, {"acme": 2}, now=T0)
    rec = Recorder(lambda request, i: httpx.Response(500, text=f"echo {request.headers}"))
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        deliver(engine, Clock(T0), transport=rec.transport)
    signature = rec.requests[0].headers["Hostmeter-Signature"]
    text = repr(logs)
    assert "webhook_attempt_failed" in text
    assert SECRET not in text and signature.split("v1=")[1] not in text


# --- a real receiver on 127.0.0.1 --------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def receiver(clock: Clock) -> Iterator[Receiver]:
    with Receiver(SECRET, clock=clock.unix) as r:
        yield r


def drive(engine: Engine, clock: Clock, *, conf: Settings | None = None,
          runs: int = 40) -> list[JobResult]:
    """Run the deliverer once a minute (by the clock) until nothing is pending."""
    results = []
    for _ in range(runs):
        result = deliver(engine, clock, conf=conf)
        assert result.status == "succeeded", result.error
        results.append(result)
        if result.counts["pending"] == 0:
            break
        clock.advance(minutes=1)
    return results


def in_order(received_ids: list[str], expected: list[str]) -> bool:
    """Every id of ``expected`` arrived, and none before its predecessor: the positions in
    ``expected`` of what arrived never go down."""
    positions = [expected.index(i) for i in received_ids if i in expected]
    return set(received_ids) >= set(expected) and positions == sorted(positions)


def test_a_receiver_that_fails_hangs_and_recovers_gets_every_event_in_order(
        engine: Engine, clock: Clock, receiver: Receiver) -> None:
    seed(engine, {None: receiver.url}, {"acme": 4, "globex": 3}, now=T0)
    receiver.script(Respond(500), Respond(429, retry_after="30"), Hang(5.0), Respond(502))
    results = drive(engine, clock)
    assert results[-1].counts["pending"] == 0 and sum(r.counts["dead"] for r in results) == 0
    got = receiver.received
    assert all(r.signature_valid for r in got)
    assert all(r.idempotency_key == r.event_id for r in got)
    delivered = receiver.delivered_ids()
    for tenant, count in (("acme", 4), ("globex", 3)):
        expected = event_ids(tenant, count)
        arrived = [r.event_id for r in got if r.event_id in expected]
        assert in_order(arrived, expected), (tenant, arrived)
        assert sorted(set(delivered) & set(expected)) == sorted(expected)
    # the failed event was retried under the same id, and the receiver had it once accepted
    first = got[0].event_id
    assert [r.answered for r in got if r.event_id == first][-1] == 200
    assert len([r for r in got if r.event_id == first]) >= 2
    assert all(r.payload is not None and r.payload["id"] == r.event_id for r in got)
    # the hang cost one timeout in its run: nothing else was sent in that run (every run has
    # its own minute, which the signature's timestamp carries)
    [hung] = [r for r in got if r.answered is None]
    assert [r.timestamp for r in got].count(hung.timestamp) == 1


def test_a_run_with_nothing_pending_sends_nothing(engine: Engine, clock: Clock,
                                                  receiver: Receiver) -> None:
    seed(engine, {"acme": receiver.url}, {"acme": 3}, now=T0)
    drive(engine, clock)
    assert receiver.delivered_ids() == event_ids("acme", 3)
    before = statuses(engine)
    clock.advance(hours=1)
    again = deliver(engine, clock)
    assert again.counts["attempts"] == 0 and len(receiver.received) == 3
    assert statuses(engine) == before


def test_a_send_whose_commit_is_lost_is_sent_again_with_the_same_id(
        engine: Engine, clock: Clock, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(engine, {"acme": receiver.url}, {"acme": 2}, now=T0)
    real = wh.record_attempt

    def crash(*args: Any, **kwargs: Any) -> bool:
        raise SystemExit("killed after the receiver answered, before the commit")

    monkeypatch.setattr(wh, "record_attempt", crash)
    with pytest.raises(SystemExit):
        deliver(engine, clock)
    monkeypatch.setattr(wh, "record_attempt", real)
    assert receiver.delivered_ids() == event_ids("acme", 1)
    drive(engine, clock)
    first, second = event_ids("acme", 2)
    assert receiver.delivered_ids() == [first, first, second]  # at least once: dedupe on id
    assert statuses(engine) == {first: ["delivered"], second: ["delivered"]}


def test_a_tenant_endpoint_and_a_global_one_each_get_the_tenants_events(
        engine: Engine, clock: Clock, receiver: Receiver) -> None:
    with Receiver(SECRET, clock=clock.unix) as other:
        seed(engine, {"acme": receiver.url, None: other.url}, {"acme": 2, "globex": 1}, now=T0)
        other.script(Respond(500))  # the global endpoint fails once; acme's is not held
        drive(engine, clock)
        assert receiver.delivered_ids() == event_ids("acme", 2)
        assert sorted(set(other.delivered_ids())) == sorted(
            event_ids("acme", 2) + event_ids("globex", 1))
