"""close / rerun / finalize against a real database (both backends), through the service API."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
import sqlalchemy as sa
from billingmonth import AFTER, END, PERIOD, START, fleet, request
from sqlalchemy.engine import Engine

from billing import models as bm
from billing import repository as repo
from billing.catalog import Catalog
from billing.errors import CoverageError, InvoiceImmutable, ReasonRequired, UnknownTenant
from billing.rules import MonthSums, Rating, rate
from billing.service import close_period, finalize_period, rerun_period
from metering import models as m
from metering.ingest import UsageRecorder
from metering.records import MonitorChange, PlanChange
from metering.snapshot import MetricLimits, snapshot_hours
from metering.timeutil import HOUR, hours_between


def dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    tables = [m.usage_snapshots, m.usage_snapshot_roles, m.snapshot_hours, bm.invoices,
              bm.invoice_lines, bm.invoice_adjustments, bm.billing_runs]
    with engine.connect() as conn:
        return {t.name: sorted(map(tuple, conn.execute(sa.select(t)).all()), key=repr)
                for t in tables}


@pytest.fixture
def recorder(engine: Engine) -> UsageRecorder:
    return UsageRecorder(engine)


def invoices(engine: Engine) -> dict[str, list[repo.StoredInvoice]]:
    with engine.connect() as conn:
        return repo.load_invoices(conn, PERIOD)


def test_close_bills_paying_tenants_and_reports_free_ones(engine: Engine,
                                                          recorder: UsageRecorder) -> None:
    recorder.record(fleet("paying", 3) + fleet("freebie", 7, plan="free")
                    + fleet("trialist", 2, plan="trial"))
    out = close_period(engine, request())
    assert out.status == "succeeded" and out.rebuilt_hours == 672
    assert [(t.tenant, t.action) for t in out.tenants] == [("paying", "created")]
    assert out.free_over_limit == (("freebie", 7),)
    inv = invoices(engine)
    assert list(inv) == ["paying"]
    assert (inv["paying"][0].standard_units, inv["paying"][0].total) == (3, 5499)
    with engine.connect() as conn:
        run = conn.execute(sa.select(bm.billing_runs)).mappings().one()
    assert (run["action"], run["actor"], run["catalog_version"], run["dry_run"]) == (
        "close", "ops@billing-1", "2019-10", False)
    assert run["summary"]["free_over_limit"] == [{"tenant": "freebie", "hosts": 7}]


def test_close_twice_writes_nothing_new(engine: Engine, recorder: UsageRecorder) -> None:
    recorder.record(fleet("a", 1))
    close_period(engine, request(run_id="one"))
    before = dump(engine)
    out = close_period(engine, request(run_id="two"))
    assert [t.action for t in out.tenants] == ["unchanged"] and out.rebuilt_hours == 0
    after = dump(engine)
    assert {k: v for k, v in after.items() if k != "billing_runs"} == {
        k: v for k, v in before.items() if k != "billing_runs"}


def test_dry_runs_write_nothing_at_all(engine: Engine, recorder: UsageRecorder) -> None:
    recorder.record(fleet("a", 2))
    before = dump(engine)
    out = close_period(engine, request(dry_run=True))
    assert [t.action for t in out.tenants] == ["created"] and out.rebuilt_hours == 672
    assert dump(engine) == before  # not even the rebuilt snapshots or the audit row
    close_period(engine, request())
    recorder.record(fleet("a", 3))
    before = dump(engine)
    preview = rerun_period(engine, request(dry_run=True, reason="check"))
    [t] = preview.tenants
    assert (t.action, t.old["standard_units"], t.new["standard_units"]) == ("revised", 2, 3)
    assert dump(engine) == before


def test_one_failing_tenant_does_not_stop_the_others(engine: Engine,
                                                     recorder: UsageRecorder) -> None:
    recorder.record(fleet("good-1", 1) + fleet("bad", 1) + fleet("good-2", 2))

    def flaky(sums: MonthSums, catalog: Catalog) -> Rating:
        if sums.tenant == "bad":
            raise RuntimeError("rating exploded")
        return rate(sums, catalog)

    out = close_period(engine, request(), rate_fn=flaky)
    assert out.status == "partial"
    assert {t.tenant: t.action for t in out.tenants} == {
        "bad": "failed", "good-1": "created", "good-2": "created"}
    assert "rating exploded" in (out.failed[0].error or "")
    assert sorted(invoices(engine)) == ["good-1", "good-2"]

    again = close_period(engine, request())  # the fix is deployed: run it again
    assert {t.tenant: t.action for t in again.tenants} == {
        "bad": "created", "good-1": "unchanged", "good-2": "unchanged"}
    assert {k: len(v) for k, v in invoices(engine).items()} == {"bad": 1, "good-1": 1,
                                                                "good-2": 1}


def test_a_failure_in_the_database_rolls_back_only_that_tenant(engine: Engine,
                                                               recorder: UsageRecorder) -> None:
    recorder.record(fleet("a", 1) + fleet("b", 1))

    def no_currency(sums: MonthSums, catalog: Catalog) -> Rating:
        r = rate(sums, catalog)
        if sums.tenant == "a":  # the invoice row violates NOT NULL after its lines are built
            return dataclasses.replace(r, currency=None)  # type: ignore[arg-type]
        return r

    out = close_period(engine, request(), rate_fn=no_currency)
    assert {t.tenant: t.action for t in out.tenants} == {"a": "failed", "b": "created"}
    assert list(invoices(engine)) == ["b"]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(bm.invoice_lines)
                            ).scalar_one() == 1


def test_final_invoices_are_immutable_in_code_and_in_the_database(
    engine: Engine, recorder: UsageRecorder
) -> None:
    recorder.record(fleet("a", 1))
    close_period(engine, request())
    finalize_period(engine, request())
    [final] = invoices(engine)["a"]
    assert final.status == "final"
    with engine.begin() as conn, pytest.raises(InvoiceImmutable):
        repo.update_invoice(conn, final, total=1)
    with engine.begin() as conn, pytest.raises(InvoiceImmutable):
        repo.void_invoice(conn, final, AFTER)
    for statement in (
        sa.update(bm.invoices).where(bm.invoices.c.id == final.id).values(total=1),
        sa.update(bm.invoices).where(bm.invoices.c.id == final.id).values(status="draft"),
        sa.delete(bm.invoices).where(bm.invoices.c.id == final.id),
        sa.update(bm.invoice_lines).where(bm.invoice_lines.c.invoice_id == final.id)
        .values(amount=0),
        sa.delete(bm.invoice_lines).where(bm.invoice_lines.c.invoice_id == final.id),
        sa.insert(bm.invoice_lines).values(invoice_id=final.id, position=99, item="x",
                                           unit="standard", units=1, unit_price=1, amount=1,
                                           basis={}),
    ):
        with pytest.raises(sa.exc.DBAPIError, match="final"), engine.begin() as conn:
            conn.execute(statement)
    assert invoices(engine)["a"] == [final]


def test_rerun_revises_drafts_and_adjusts_finals(engine: Engine,
                                                 recorder: UsageRecorder) -> None:
    recorder.record(fleet("a", 1))
    close_period(engine, request())
    recorder.record(fleet("a", 2))  # a second host all month
    out = rerun_period(engine, request(reason="late"))
    assert [(t.action, t.revision) for t in out.tenants] == [("revised", 2)]
    revs = invoices(engine)["a"]
    assert [(r.revision, r.status, r.standard_units) for r in revs] == [
        (1, "void", 1), (2, "draft", 2)]
    assert revs[1].adjustments == ()

    finalize_period(engine, request())
    recorder.record(fleet("a", 3))
    with pytest.raises(ReasonRequired):
        rerun_period(engine, request())
    out = rerun_period(engine, request(reason="third host was missing"))
    assert [(t.action, t.revision, t.adjustment) for t in out.tenants] == [
        ("adjusted", 3, 1833)]
    revs = invoices(engine)["a"]
    assert [(r.revision, r.status) for r in revs] == [(1, "void"), (2, "final"), (3, "draft")]
    [adj] = revs[2].adjustments
    assert (adj["adjusts_revision"], adj["amount"], adj["standard_units"]) == (2, 1833, 1)

    # Unchanged data: nothing new. Data back to what the final says: the draft is voided.
    assert [t.action for t in rerun_period(engine, request()).tenants] == ["unchanged"]


def test_a_rerun_refused_for_want_of_a_reason_changes_nothing(
    engine: Engine, recorder: UsageRecorder
) -> None:
    recorder.record(fleet("a", 1))
    close_period(engine, request())
    finalize_period(engine, request())
    recorder.record(fleet("a", 2))  # the month's usage changed after the final invoice
    before = dump(engine)
    for reason in (None, "", "   \t"):  # blank text is no reason
        with pytest.raises(ReasonRequired):
            rerun_period(engine, request(reason=reason))
        assert dump(engine) == before  # not even the re-snapshotted hours


def test_a_dry_run_rerun_of_a_final_month_needs_no_reason(
    engine: Engine, recorder: UsageRecorder
) -> None:
    recorder.record(fleet("a", 1))
    close_period(engine, request())
    finalize_period(engine, request())
    recorder.record(fleet("a", 2))
    before = dump(engine)
    out = rerun_period(engine, request(dry_run=True))
    assert [(t.action, t.adjustment) for t in out.tenants] == [("adjusted", 1833)]
    assert dump(engine) == before
    out = rerun_period(engine, request(reason="  second host was missing  "))
    assert [(t.action, t.adjustment) for t in out.tenants] == [("adjusted", 1833)]
    with engine.connect() as conn:
        reasons = conn.execute(sa.select(bm.billing_runs.c.reason)
                               .where(bm.billing_runs.c.action == "rerun")).scalars().all()
    assert reasons == ["second host was missing"]


def test_rerun_of_selected_tenants_only(engine: Engine, recorder: UsageRecorder) -> None:
    recorder.record(fleet("a", 1) + fleet("b", 1))
    close_period(engine, request())
    recorder.record(fleet("a", 2) + fleet("b", 2))
    out = rerun_period(engine, request(tenants=("a",)))
    assert [(t.tenant, t.action) for t in out.tenants] == [("a", "revised")]
    assert [r.status for r in invoices(engine)["b"]] == ["draft"]
    with pytest.raises(UnknownTenant, match="nobody"):
        rerun_period(engine, request(tenants=("a", "nobody")))


def test_coverage_hours_not_over_cannot_be_rebuilt(engine: Engine,
                                                   recorder: UsageRecorder) -> None:
    recorder.record(fleet("a", 1))
    with pytest.raises(CoverageError, match="not over yet") as info:
        close_period(engine, request(logical_time=END - 2 * HOUR))
    assert len(info.value.context["hours"]) == 2
    assert invoices(engine) == {}


def test_monitor_only_tenant_pays_the_minimum_charge(engine: Engine,
                                                     recorder: UsageRecorder) -> None:
    recorder.record([PlanChange(tenant="mon", plan="standard", at=START),
                     MonitorChange(tenant="mon", monitor="m", at=START, present=True)])
    close_period(engine, request())
    [inv] = invoices(engine)["mon"]
    assert [ln["item"] for ln in inv.lines] == ["minimum_charge"] and inv.total == 1833


def test_two_closes_at_once_write_one_revision(engine: Engine, recorder: UsageRecorder) -> None:
    import threading

    recorder.record(fleet("a", 1) + fleet("b", 2))
    with engine.begin() as conn:  # every hour snapshotted: the closes go straight to billing
        snapshot_hours(conn, list(hours_between(START, END)), limits=MetricLimits(),
                       run_id="pre", snapshotted_at=AFTER)
    arrived = threading.Barrier(3)

    def rate_together(sums: MonthSums, catalog: Catalog) -> Rating:
        # Without the period lock all three closes meet here and insert revision 1 at once;
        # with it, the first waits in vain (timeout) and the others come after it has committed.
        with contextlib.suppress(threading.BrokenBarrierError):
            arrived.wait(timeout=2)
        return rate(sums, catalog)

    results: list[Any] = []
    errors: list[BaseException] = []

    def close(i: int) -> None:
        try:
            results.append(close_period(engine, request(run_id=f"parallel-{i}"),
                                        rate_fn=rate_together))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=close, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [r.status for r in results] == ["succeeded"] * 3
    assert sorted(t.action for r in results for t in r.tenants) == (
        ["created"] * 2 + ["unchanged"] * 4)
    assert {k: [r.revision for r in v] for k, v in invoices(engine).items()} == {
        "a": [1], "b": [1]}
