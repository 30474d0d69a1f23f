"""Invoice events in the outbox: written by close / rerun / finalize in their own transaction,
one per change a customer can see, none for unchanged, stale, failed tenants or dry runs
(both backends)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from billingmonth import PERIOD, fleet, request
from sqlalchemy.engine import Engine

from billing import notices as n
from billing.catalog import Catalog
from billing.outbox import event_id, sign, verify
from billing.rules import MonthSums, Rating, rate
from billing.service import close_period, finalize_period, rerun_period
from metering import models as m
from metering.ingest import UsageRecorder


def events(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(n.outbox_events.c.payload)
                            .order_by(n.outbox_events.c.id)).scalars().all()
    return [dict(r) for r in rows]


def seen(engine: Engine) -> list[tuple[str, str, Any]]:
    return [(e["type"], e["tenant"], e["data"].get("revision")) for e in events(engine)]


def tenant_id(engine: Engine, key: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(m.tenants.c.id).where(m.tenants.c.key == key))
                   .scalar_one())


def add_endpoint(engine: Engine, tenant: str | None, url: str) -> None:
    tid = tenant_id(engine, tenant) if tenant else None
    with engine.begin() as conn:
        conn.execute(sa.insert(n.webhook_endpoints).values(
            tenant_id=tid, url=url, secret="s3cret",
            enabled=True, created_at=datetime(2026, 3, 1, tzinfo=UTC), created_by="ops"))


def test_close_drafts_one_event_per_invoice_and_fans_out_to_endpoints(
    engine: Engine, tmp_path: Any
) -> None:
    UsageRecorder(engine).record(fleet("a", 2) + fleet("b", 1) + fleet("free", 3, plan="free"))
    add_endpoint(engine, "a", "https://a.example/hook")
    add_endpoint(engine, None, "https://billing.example/all")
    close_period(engine, request())
    assert seen(engine) == [("invoice.drafted", "a", 1), ("invoice.drafted", "b", 1)]
    first = events(engine)[0]
    assert first["id"] == event_id(f"invoice.drafted:a:{PERIOD}:1")
    data = first["data"]
    assert (data["period"], data["status"], data["standard_units"], data["total"]) == (
        PERIOD, "draft", 2, "3666")
    assert data["lines"][0]["item"] == "standard_hosts" and data["adjustment"] is None
    with engine.connect() as conn:
        fanned = conn.execute(
            sa.select(n.webhook_endpoints.c.url, m.tenants.c.key)
            .select_from(n.webhook_deliveries)
            .join(n.webhook_endpoints,
                  n.webhook_endpoints.c.id == n.webhook_deliveries.c.endpoint_id)
            .join(m.tenants, m.tenants.c.id == n.webhook_deliveries.c.tenant_id)
        ).all()
    # a's endpoint gets a's event only; the global endpoint gets both.
    assert sorted(map(tuple, fanned)) == [
        ("https://a.example/hook", "a"), ("https://billing.example/all", "a"),
        ("https://billing.example/all", "b")]

    close_period(engine, request())  # closing twice announces nothing twice
    assert len(events(engine)) == 2


def test_rerun_that_changes_nothing_writes_no_event(engine: Engine) -> None:
    recorder = UsageRecorder(engine)
    recorder.record(fleet("a", 1))
    close_period(engine, request())
    rerun_period(engine, request())
    rerun_period(engine, request(dry_run=True))
    assert seen(engine) == [("invoice.drafted", "a", 1)]

    recorder.record(fleet("a", 2))
    rerun_period(engine, request(dry_run=True))  # a preview announces nothing
    assert len(events(engine)) == 1
    rerun_period(engine, request())
    assert seen(engine)[1:] == [("invoice.revised", "a", 2)]
    revised = events(engine)[1]["data"]
    assert (revised["change"], revised["replaces_revision"], revised["standard_units"]) == (
        "revised", 1, 2)


def test_finalize_and_an_adjusted_final_each_send_their_event(engine: Engine) -> None:
    recorder = UsageRecorder(engine)
    recorder.record(fleet("a", 1) + fleet("b", 1))
    close_period(engine, request())
    finalize_period(engine, request(dry_run=True))
    assert [t for t, _, _ in seen(engine)] == ["invoice.drafted"] * 2
    finalize_period(engine, request())
    assert seen(engine)[2:] == [("invoice.finalized", "a", 1), ("invoice.finalized", "b", 1)]
    assert events(engine)[2]["data"]["total"] == "1833"
    finalize_period(engine, request())  # nothing left to finalize: nothing to say
    assert len(events(engine)) == 4

    recorder.record(fleet("a", 2))
    rerun_period(engine, request(reason="late agent"))
    assert seen(engine)[4:] == [("invoice.revised", "a", 2)]
    adjusted = events(engine)[4]["data"]
    assert adjusted["change"] == "adjusted" and adjusted["status"] == "draft"
    assert adjusted["adjustment"] == {"against_revision": 1, "amount": "1833",
                                      "standard_units": 1, "micro_units": 0,
                                      "reason": "late agent"}


def test_a_failed_tenant_announces_nothing(engine: Engine) -> None:
    UsageRecorder(engine).record(fleet("good", 1) + fleet("bad", 1))

    def flaky(sums: MonthSums, catalog: Catalog) -> Rating:
        if sums.tenant == "bad":
            raise RuntimeError("rating exploded")
        return rate(sums, catalog)

    close_period(engine, request(), rate_fn=flaky)
    assert seen(engine) == [("invoice.drafted", "good", 1)]
    close_period(engine, request())
    assert seen(engine)[1:] == [("invoice.drafted", "bad", 1)]


def test_events_commit_with_the_invoices_or_not_at_all(engine: Engine) -> None:
    """The event is written in the billing run's transaction: if it cannot be written, no
    invoice is written either (and running again writes both)."""
    UsageRecorder(engine).record(fleet("a", 1))
    clash = event_id(f"invoice.drafted:a:{PERIOD}:1")
    tid = tenant_id(engine, "a")
    with engine.begin() as conn:
        conn.execute(sa.insert(n.outbox_events).values(
            event_id=clash, type="invoice.drafted", tenant_id=tid,
            payload={}, created_at=datetime(2026, 3, 1, tzinfo=UTC)))
    with pytest.raises(Exception, match="outbox_events"):  # the unique event id refuses it
        close_period(engine, request())
    with engine.connect() as conn:
        from billing import models as bm

        assert conn.execute(sa.select(sa.func.count()).select_from(bm.invoices)).scalar() == 0
        conn.execute(sa.delete(n.outbox_events))
        conn.commit()
    close_period(engine, request())
    assert seen(engine) == [("invoice.drafted", "a", 1)]


def test_the_signature_verifies_and_refuses_tampering_and_old_timestamps() -> None:
    body = b'{"id":"evt_1"}'
    header = sign("whsec", 1_800_000_000, body)
    assert verify("whsec", header, body, now=1_800_000_100)
    assert not verify("whsec", header, body + b" ", now=1_800_000_100)
    assert not verify("other", header, body, now=1_800_000_100)
    assert not verify("whsec", header, body, now=1_800_000_000 + 301)
    assert not verify("whsec", "garbage", body, now=1_800_000_000)
