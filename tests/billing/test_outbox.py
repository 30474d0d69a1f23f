"""The outbox's signature and fan-out, and :mod:`billing.webhooks`: endpoints, the delivery queue
and the retry policy.

- ``sign``/``verify``: a receiver accepts exactly the bytes and timestamp that were signed,
  under the right secret, within its tolerance.
- ``enqueue`` fans an event out to the endpoints enabled when it is written (the tenant's and
  the global ones), never to an endpoint added later or removed before.
- endpoints: https only (http to loopback), no credentials or fragment in the URL, a one-line
  secret, a known tenant, no duplicate; removing one gives up its pending deliveries.
- the queue: only the oldest pending delivery of an (endpoint, tenant) pair is due; delivered
  or dead ones unblock the pair.
- the retry policy as a table: which answers are retried, the backoff and its cap,
  Retry-After, the window.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billing import notices as n
from billing import outbox
from billing import webhooks as wh
from billing.errors import UnknownTenant, WebhookRefused
from metering.models import tenants

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
SECRET = "whsec-test-0123456789"


def add_tenants(conn: Connection, *keys: str) -> dict[str, int]:
    out = {}
    for key in keys:
        out[key] = conn.execute(sa.insert(tenants).values(key=key)
                                .returning(tenants.c.id)).scalar_one()
    return out


def event(tenant: str, tenant_id: int, key: str, type_: str = "invoice.drafted") -> outbox.Event:
    return outbox.Event(type=type_, tenant=tenant, tenant_id=tenant_id, key=key,
                        data={"key": key})


def deliveries(engine: Engine) -> list[tuple[int, int, int, str]]:
    d = n.webhook_deliveries
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            sa.select(d.c.event_pk, d.c.endpoint_id, d.c.tenant_id, d.c.status)
            .order_by(d.c.event_pk, d.c.endpoint_id))]


# --- signature ---------------------------------------------------------------------------------


def test_a_signature_verifies_for_the_same_secret_body_and_a_recent_timestamp() -> None:
    body = outbox.body_bytes({"id": "evt_1", "data": {"amount": 1200, "name": "ア"}})
    header = outbox.sign(SECRET, 1_800_000_000, body)
    assert header.startswith("t=1800000000,v1=")
    assert outbox.verify(SECRET, header, body, now=1_800_000_000 + 299)
    assert not outbox.verify(SECRET, header, body, now=1_800_000_000 + 301)  # too old
    assert not outbox.verify("another-secret", header, body, now=1_800_000_000)
    assert not outbox.verify(SECRET, header, body + b" ", now=1_800_000_000)
    tampered = header.replace("t=1800000000", "t=1800000001")
    assert not outbox.verify(SECRET, tampered, body, now=1_800_000_000)
    assert not outbox.verify(SECRET, "garbage", body, now=1_800_000_000)


def test_the_body_is_the_same_bytes_every_time() -> None:
    payload = {"b": 1, "a": {"y": 2, "x": "é"}}
    assert outbox.body_bytes(payload) == outbox.body_bytes(json.loads(json.dumps(payload)))
    assert outbox.body_bytes(payload) == '{"a":{"x":"é","y":2},"b":1}'.encode()


# --- fan-out and endpoints ---------------------------------------------------------------------


def test_events_go_to_the_endpoints_enabled_when_they_are_written(engine: Engine) -> None:
    with engine.begin() as conn:
        ids = add_tenants(conn, "acme", "globex")
        acme = wh.add_endpoint(conn, url="https://acme.example/h", secret=SECRET, tenant="acme",
                               now=T0, created_by="t")
        everyone = wh.add_endpoint(conn, url="https://all.example/h", secret=SECRET,
                                   tenant=None, now=T0, created_by="t")
        outbox.enqueue(conn, [event("acme", ids["acme"], "a1"),
                              event("globex", ids["globex"], "g1")], now=T0)
    with engine.begin() as conn:
        late = wh.add_endpoint(conn, url="https://late.example/h", secret=SECRET,
                               tenant="globex", now=T0, created_by="t")
        outbox.enqueue(conn, [event("globex", ids["globex"], "g2")], now=T0)
    with engine.begin() as conn:
        wh.remove_endpoint(conn, everyone.id, now=T0)
        outbox.enqueue(conn, [event("acme", ids["acme"], "a2")], now=T0)
    # removing the global endpoint gave up its pending deliveries
    assert deliveries(engine) == [
        (1, acme.id, ids["acme"], "pending"), (1, everyone.id, ids["acme"], "dead"),
        (2, everyone.id, ids["globex"], "dead"),
        # g2: the global endpoint and the one added before it
        (3, everyone.id, ids["globex"], "dead"), (3, late.id, ids["globex"], "pending"),
        (4, acme.id, ids["acme"], "pending"),  # the global endpoint was removed by then
    ]


def test_removing_an_endpoint_gives_up_its_pending_deliveries(engine: Engine) -> None:
    with engine.begin() as conn:
        ids = add_tenants(conn, "acme")
        ep = wh.add_endpoint(conn, url="https://acme.example/h", secret=SECRET, tenant="acme",
                             now=T0, created_by="t")
        outbox.enqueue(conn, [event("acme", ids["acme"], f"a{i}") for i in range(3)], now=T0)
    with engine.begin() as conn:
        removed, given_up = wh.remove_endpoint(conn, ep.id, now=T0 + timedelta(hours=1))
    assert given_up == 3 and not removed.enabled
    with engine.connect() as conn:
        dead = wh.list_deliveries(conn, status="dead")
        assert {r.last_error for r in dead} == {"endpoint removed"} and len(dead) == 3
        assert wh.due_heads(conn, now=T0 + timedelta(days=1)) == []
        [shown] = wh.list_endpoints(conn)
        assert shown.disabled_at == T0 + timedelta(hours=1)
    with engine.begin() as conn, pytest.raises(WebhookRefused, match="removed already"):
        wh.remove_endpoint(conn, ep.id, now=T0)
    with engine.begin() as conn, pytest.raises(WebhookRefused, match="endpoint was removed"):
        wh.redeliver(conn, [dead[0].id], now=T0)
    with engine.begin() as conn, pytest.raises(WebhookRefused, match="no webhook endpoint 99"):
        wh.remove_endpoint(conn, 99, now=T0)


def test_endpoints_never_carry_their_secret(engine: Engine) -> None:
    with engine.begin() as conn:
        add_tenants(conn, "acme")
        added = wh.add_endpoint(conn, url="https://acme.example/h", secret=SECRET,
                                tenant="acme", now=T0, created_by="t")
        listed = wh.list_endpoints(conn)
    assert SECRET not in repr(added) and SECRET not in repr(listed)
    assert not hasattr(added, "secret")


def test_an_unknown_tenant_or_a_duplicate_endpoint_is_refused(engine: Engine) -> None:
    with engine.begin() as conn:
        add_tenants(conn, "acme")
        wh.add_endpoint(conn, url="https://acme.example/h", secret=SECRET, tenant="acme",
                        now=T0, created_by="t")
    with engine.begin() as conn, pytest.raises(UnknownTenant, match="'nope'"):
        wh.add_endpoint(conn, url="https://x.example/h", secret=SECRET, tenant="nope", now=T0,
                        created_by="t")
    with engine.begin() as conn, pytest.raises(WebhookRefused, match="already sends"):
        wh.add_endpoint(conn, url="https://acme.example/h", secret="other-secret",
                        tenant="acme", now=T0, created_by="t")
    with engine.begin() as conn:  # the same URL for every tenant is another endpoint
        wh.add_endpoint(conn, url="https://acme.example/h", secret=SECRET, tenant=None,
                        now=T0, created_by="t")


@pytest.mark.parametrize("url", [
    "https://hooks.example.com/hostmeter",
    "https://hooks.example.com:8443/a?b=c",
    "http://127.0.0.1:8080/hooks",
    "http://127.9.9.9/hooks",
    "http://localhost/hooks",
    "http://[::1]:9000/hooks",
])
def test_good_urls(url: str) -> None:
    assert wh.check_url(url) == url


@pytest.mark.parametrize(("url", "why"), [
    ("http://hooks.example.com/h", "must use https"),
    ("http://10.0.0.1/h", "must use https"),
    ("ftp://hooks.example.com/h", "not an https"),
    ("hooks.example.com/h", "not an https"),
    ("https:///nohost", "not an https"),
    ("https://user:pw@hooks.example.com/h", "user:password@"),
    ("https://hooks.example.com/h#frag", "fragment"),
    ("https://hooks.example.com:99999/h", "malformed"),
    ("https://hooks.example.com/a b", "spaces or control"),
    ("https://hooks.example.com/\x1b[2J", "spaces or control"),
    ("", "1 to 2048"),
    ("https://h.example/" + "a" * 2048, "1 to 2048"),
])
def test_bad_urls_are_refused_with_a_reason(url: str, why: str) -> None:
    with pytest.raises(WebhookRefused, match=why) as info:
        wh.check_url(url)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)


@pytest.mark.parametrize(("given", "stored"), [
    ("s3cret-value\n", "s3cret-value"), ("s3cret-value\r\n", "s3cret-value"),
    ("with spaces inside", "with spaces inside"),
])
def test_secrets_lose_the_final_newline_of_a_file(given: str, stored: str) -> None:
    assert wh.check_secret(given) == stored


@pytest.mark.parametrize(("given", "why"), [
    ("", "empty"), ("\n", "empty"), ("   ", "empty"), ("two\nlines", "one line"),
    ("bell\x07", "one line"), ("x" * 1025, "longer than"),
])
def test_bad_secrets_are_refused_without_being_repeated(given: str, why: str) -> None:
    with pytest.raises(WebhookRefused, match=why) as info:
        wh.check_secret(given)
    if given.strip():
        assert given.strip() not in str(info.value)


# --- the queue ---------------------------------------------------------------------------------


def test_only_the_oldest_pending_delivery_of_a_pair_is_due(engine: Engine) -> None:
    with engine.begin() as conn:
        ids = add_tenants(conn, "acme", "globex")
        ep = wh.add_endpoint(conn, url="https://all.example/h", secret=SECRET, tenant=None,
                             now=T0, created_by="t")
        outbox.enqueue(conn, [event("acme", ids["acme"], f"a{i}") for i in range(3)]
                       + [event("globex", ids["globex"], "g0")], now=T0)
    with engine.connect() as conn:
        heads = wh.due_heads(conn, now=T0)
        assert sorted((h.tenant, h.payload["data"]["key"]) for h in heads) == [
            ("acme", "a0"), ("globex", "g0")]
        assert wh.due_heads(conn, now=T0 - timedelta(seconds=1)) == []
        assert wh.due_heads(conn, now=T0, skip_endpoints=[ep.id]) == []
        assert SECRET not in repr(heads)
    a0 = next(h for h in heads if h.tenant == "acme")
    # a0 fails: the pair waits, even though a1 is due
    with engine.begin() as conn:
        assert wh.record_attempt(conn, a0, at=T0, outcome="retry", status=500,
                                 error="HTTP 500", next_attempt_at=T0 + timedelta(minutes=1))
    with engine.connect() as conn:
        assert [h.tenant for h in wh.due_heads(conn, now=T0 + timedelta(seconds=30))] == [
            "globex"]
        nxt = wh.next_of_pair(conn, *a0.pair)
        assert nxt is not None and nxt.id == a0.id and nxt.attempts == 1
        # a stale copy of the row (attempts 0) is not written over
    with engine.begin() as conn:
        assert not wh.record_attempt(conn, a0, at=T0, outcome="delivered", status=200,
                                     error=None, next_attempt_at=None)
    with engine.begin() as conn:  # dead: the pair's next one is the head
        assert wh.record_attempt(conn, nxt, at=T0, outcome="dead", status=410,
                                 error="HTTP 410", next_attempt_at=None)
    with engine.connect() as conn:
        heads = wh.due_heads(conn, now=T0 + timedelta(seconds=30))
        assert sorted((h.tenant, h.payload["data"]["key"]) for h in heads) == [
            ("acme", "a1"), ("globex", "g0")]
        stats = wh.queue_stats(conn, now=T0 + timedelta(minutes=10))
        assert (stats.pending, stats.due, stats.oldest_age_s) == (3, 3, 600.0)


def test_redeliver_queues_the_same_event_again_with_a_fresh_window(engine: Engine) -> None:
    with engine.begin() as conn:
        ids = add_tenants(conn, "acme")
        wh.add_endpoint(conn, url="https://acme.example/h", secret=SECRET, tenant="acme",
                        now=T0, created_by="t")
        outbox.enqueue(conn, [event("acme", ids["acme"], "a0"), event("acme", ids["acme"], "a1")],
                       now=T0)
        [first] = wh.due_heads(conn, now=T0)
    with engine.begin() as conn:
        wh.record_attempt(conn, first, at=T0, outcome="dead", status=404, error="HTTP 404",
                          next_attempt_at=None)
    later = T0 + timedelta(days=5)
    with engine.begin() as conn:
        [requeued] = wh.redeliver(conn, [first.id], now=later)
    assert (requeued.was, requeued.attempts_before, requeued.event_id) == (
        "dead", 1, first.event_id)
    with engine.connect() as conn:
        [head] = wh.due_heads(conn, now=later)
    assert (head.id, head.attempts, head.created_at, head.event_id) == (
        first.id, 0, later, first.event_id)
    assert head.payload == first.payload
    with engine.begin() as conn:
        assert wh.redeliver(conn, all_failed=True, now=later) == []  # nothing dead now
        with pytest.raises(WebhookRefused, match="no webhook delivery 999"):
            wh.redeliver(conn, [first.id, 999], now=later)


# --- the retry policy --------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "outcome"), [
    (200, "delivered"), (201, "delivered"), (204, "delivered"), (299, "delivered"),
    (None, "retry"), (408, "retry"), (429, "retry"), (500, "retry"), (502, "retry"),
    (503, "retry"), (504, "retry"),
    (301, "dead"), (302, "dead"), (307, "dead"), (400, "dead"), (401, "dead"), (403, "dead"),
    (404, "dead"), (409, "dead"), (410, "dead"), (413, "dead"), (422, "dead"),
])
def test_what_an_answer_makes_of_a_delivery(status: int | None, outcome: str) -> None:
    assert wh.outcome_of(status) == outcome


WINDOW = timedelta(hours=72)


@pytest.mark.parametrize(("attempts", "delay"), [
    (1, timedelta(minutes=1)), (2, timedelta(minutes=2)), (3, timedelta(minutes=4)),
    (6, timedelta(minutes=32)), (7, timedelta(hours=1)), (40, timedelta(hours=1)),
])
def test_backoff_doubles_up_to_an_hour(attempts: int, delay: timedelta) -> None:
    at = T0 + timedelta(hours=1)
    assert wh.retry_at(attempts=attempts, at=at, created_at=T0, window=WINDOW) == at + delay


@pytest.mark.parametrize(("retry_after", "delay"), [
    (timedelta(seconds=90), timedelta(seconds=90)),   # shorter than the backoff: honoured
    (timedelta(hours=5), timedelta(hours=1)),         # longer than the cap: capped
    (timedelta(0), timedelta(seconds=1)),             # 0: still a later run
])
def test_retry_after_replaces_the_backoff_within_the_cap(retry_after: timedelta,
                                                         delay: timedelta) -> None:
    at = T0 + timedelta(hours=1)
    assert wh.retry_at(attempts=5, at=at, created_at=T0, window=WINDOW,
                       retry_after=retry_after) == at + delay


def test_the_last_attempt_is_at_the_end_of_the_window_then_dead() -> None:
    end = T0 + WINDOW
    assert wh.retry_at(attempts=50, at=end - timedelta(minutes=10), created_at=T0,
                       window=WINDOW) == end
    assert wh.retry_at(attempts=51, at=end, created_at=T0, window=WINDOW) is None
    assert wh.retry_at(attempts=1, at=T0, created_at=T0, window=timedelta(0)) is None


@pytest.mark.parametrize(("value", "delay"), [
    ("120", timedelta(seconds=120)), (" 7 ", timedelta(seconds=7)),
    ("Mon, 02 Nov 2026 09:05:00 GMT", timedelta(minutes=5)),
    ("Mon, 02 Nov 2026 08:00:00 GMT", timedelta(0)),  # in the past
    ("soon", None), ("", None), (None, None), ("-5", None),
])
def test_retry_after_header(value: str | None, delay: timedelta | None) -> None:
    assert wh.parse_retry_after(value, T0) == delay
