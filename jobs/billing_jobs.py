"""``close-billing-period`` and ``finalize-invoices``: the monthly billing jobs.

Window: the scheduled time → the previous calendar month in the billing time zone (a trigger on
the 1st at 03:00 Asia/Tokyo closes the month that just ended); ``--period`` overrides it.

Per-item events: a close or a rerun that has committed logs one ``tenant_billed`` (info) per
tenant it rated, fields ``tenant``, ``period``, ``std_units``, ``micro_units``, ``amount`` (the
invoice's total, a decimal string of yen) and ``status``, what the billing service did:
``created`` (revision 1 written), ``revised``, ``adjusted`` (a final invoice corrected by a new
draft and an adjustment), ``restored`` (the data came back to the final invoice's),
``unchanged``, or ``stale`` (a close that found an invoice it may not revise: the numbers are
the standing invoice's). A tenant that failed has its ``tenant_failed`` event instead, and a
dry run, which bills no one, logs none.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from billing.service import (
    BillingOutcome,
    BillingRequest,
    close_period,
    finalize_period,
    rerun_period,
)
from jobs.runtime.context import JobContext, actor
from jobs.runtime.logconfig import item_events
from metering.timeutil import previous_period

__all__ = ["close", "finalize", "period_for", "rerun"]


def period_for(ctx: JobContext, logical_time: datetime) -> str:
    return previous_period(logical_time, ctx.settings.zone)


def _request(ctx: JobContext, logical_time: datetime, period: str | None,
             **options: Any) -> BillingRequest:
    return BillingRequest(
        period=period or period_for(ctx, logical_time), zone=ctx.settings.zone,
        logical_time=logical_time, actor=options.pop("actor", None) or actor(),
        run_id=ctx.run_id, now=ctx.clock(), **options,
    )


def _counts(outcome: BillingOutcome, sink: list[BillingOutcome] | None) -> dict[str, Any]:
    if sink is not None:
        sink.append(outcome)
    return {"status": outcome.status, "period": outcome.period, "catalog": outcome.catalog,
            "dry_run": outcome.dry_run, **outcome.counts()}


def _log_billed(outcome: BillingOutcome) -> None:
    """One ``tenant_billed`` event per tenant rated (see the module docstring)."""
    if outcome.dry_run:
        return
    with item_events("tenant_billed") as emit:
        for t in outcome.tenants:
            invoice = t.old if t.action == "stale" else t.new
            if t.action == "failed" or invoice is None:
                continue
            emit(tenant=t.tenant, period=outcome.period, std_units=invoice["standard_units"],
                 micro_units=invoice["micro_units"], amount=str(invoice["total"]),
                 status=t.action)


def close(ctx: JobContext, logical_time: datetime, *, period: str | None = None,
          tenants: tuple[str, ...] = (), dry_run: bool = False, shard: Any = None,
          outcomes: list[BillingOutcome] | None = None) -> dict[str, Any]:
    """``shard`` (a :class:`jobs.triggers.runner.Shard`) limits the close to its share of
    tenants."""
    req = _request(ctx, logical_time, period, tenants=tenants, dry_run=dry_run,
                   owns=shard.owns if shard is not None and shard.count > 1 else None)
    outcome = close_period(ctx.engine, req)
    _log_billed(outcome)
    return _counts(outcome, outcomes)


def rerun(ctx: JobContext, logical_time: datetime, *, period: str | None = None,
          tenants: tuple[str, ...] = (), dry_run: bool = False, reason: str | None = None,
          outcomes: list[BillingOutcome] | None = None) -> dict[str, Any]:
    req = _request(ctx, logical_time, period, tenants=tenants, dry_run=dry_run, reason=reason)
    outcome = rerun_period(ctx.engine, req)
    _log_billed(outcome)
    return _counts(outcome, outcomes)


def finalize(ctx: JobContext, logical_time: datetime, *, period: str | None = None,
             tenants: tuple[str, ...] = (), dry_run: bool = False,
             outcomes: list[BillingOutcome] | None = None) -> dict[str, Any]:
    req = _request(ctx, logical_time, period, tenants=tenants, dry_run=dry_run)
    return _counts(finalize_period(ctx.engine, req), outcomes)
