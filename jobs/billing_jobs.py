"""``close-billing-period`` and ``finalize-invoices``: the monthly billing jobs.

Window: the scheduled time → the previous calendar month in the billing time zone (a trigger on
the 1st at 03:00 Asia/Tokyo closes the month that just ended); ``--period`` overrides it.
"""

from __future__ import annotations

import getpass
import socket
from datetime import datetime
from typing import Any

from billing.service import (
    BillingOutcome,
    BillingRequest,
    close_period,
    finalize_period,
    rerun_period,
)
from jobs.runtime.context import JobContext
from metering.timeutil import previous_period

__all__ = ["actor", "close", "finalize", "period_for", "rerun"]


def actor() -> str:
    """``user@host`` of whoever runs this process (recorded on every billing run)."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


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


def close(ctx: JobContext, logical_time: datetime, *, period: str | None = None,
          tenants: tuple[str, ...] = (), dry_run: bool = False, shard: Any = None,
          outcomes: list[BillingOutcome] | None = None) -> dict[str, Any]:
    """``shard`` (a :class:`jobs.triggers.runner.Shard`) limits the close to its share of
    tenants."""
    req = _request(ctx, logical_time, period, tenants=tenants, dry_run=dry_run,
                   owns=shard.owns if shard is not None and shard.count > 1 else None)
    return _counts(close_period(ctx.engine, req), outcomes)


def rerun(ctx: JobContext, logical_time: datetime, *, period: str | None = None,
          tenants: tuple[str, ...] = (), dry_run: bool = False, reason: str | None = None,
          outcomes: list[BillingOutcome] | None = None) -> dict[str, Any]:
    req = _request(ctx, logical_time, period, tenants=tenants, dry_run=dry_run, reason=reason)
    return _counts(rerun_period(ctx.engine, req), outcomes)


def finalize(ctx: JobContext, logical_time: datetime, *, period: str | None = None,
             tenants: tuple[str, ...] = (), dry_run: bool = False,
             outcomes: list[BillingOutcome] | None = None) -> dict[str, Any]:
    req = _request(ctx, logical_time, period, tenants=tenants, dry_run=dry_run)
    return _counts(finalize_period(ctx.engine, req), outcomes)
