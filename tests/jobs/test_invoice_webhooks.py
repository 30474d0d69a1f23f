"""From a billing run to a receiver: close, rerun and finalize, then ``deliver-webhooks`` against
a real HTTP server on 127.0.0.1 (both backends).

Every invoice event arrives once, signed, in order per tenant (drafted before revised before
finalized); a rerun that changes nothing, and a dry run, send nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime

from billingmonth import fleet, request
from sqlalchemy.engine import Engine

from billing.service import close_period, finalize_period, rerun_period
from billing.webhooks import add_endpoint
from jobs import deliver_webhooks
from jobs.runtime.context import JobContext, JobResult, run_job
from jobs.synthetic.receiver import Receiver
from metering.ingest import UsageRecorder
from metering.settings import Settings

SECRET = "whsec-invoice-events-51d0"


def deliver(engine: Engine) -> JobResult:
    ctx = JobContext(engine=engine, settings=Settings(webhook_timeout_s=5))
    result = run_job("deliver-webhooks", deliver_webhooks.run, ctx, datetime.now(UTC))
    assert result.ok, result.error
    return result


def test_invoice_events_reach_a_receiver_once_in_order_and_signed(engine: Engine) -> None:
    recorder = UsageRecorder(engine)
    recorder.record(fleet("a", 1) + fleet("b", 2))
    with Receiver(SECRET) as receiver:
        with engine.begin() as conn:
            add_endpoint(conn, url=receiver.url, secret=SECRET, tenant=None,
                         now=datetime(2026, 3, 1, tzinfo=UTC), created_by="ops")

        def got() -> list[tuple[str, str, int]]:
            assert all(r.signature_valid and r.accepted for r in receiver.received)
            return [(r.payload["tenant"], r.event_type, r.payload["data"]["revision"])
                    for r in receiver.received if r.payload and r.event_type]

        close_period(engine, request())
        assert deliver(engine).counts["delivered"] == 2
        assert sorted(got()) == [("a", "invoice.drafted", 1), ("b", "invoice.drafted", 1)]

        rerun_period(engine, request())  # nothing changed
        rerun_period(engine, request(dry_run=True))
        finalize_period(engine, request(dry_run=True))
        assert deliver(engine).counts["delivered"] == 0
        assert len(receiver.received) == 2

        recorder.record(fleet("a", 2))  # a second host for tenant a, all month
        rerun_period(engine, request())
        finalize_period(engine, request())
        assert deliver(engine).counts["delivered"] == 3
        per_tenant: dict[str, list[tuple[str, int]]] = {}
        for tenant, kind, revision in got():
            per_tenant.setdefault(tenant, []).append((kind, revision))
        assert per_tenant == {
            "a": [("invoice.drafted", 1), ("invoice.revised", 2), ("invoice.finalized", 2)],
            "b": [("invoice.drafted", 1), ("invoice.finalized", 1)],
        }
        ids = [r.event_id for r in receiver.received]
        assert len(ids) == len(set(ids)) == 5
        assert all(r.idempotency_key == r.event_id for r in receiver.received)
        assert deliver(engine).counts["delivered"] == 0
