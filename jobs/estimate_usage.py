"""``estimate-usage``: every paying tenant's month to date and projection, stored hourly, and
the budget alerts checked against it.

Window: the scheduled time ``T`` (hourly at :15, after ``snapshot-usage`` at :05) →
``as_of = floor_hour(T)``, the exclusive end of the hours counted, and the month of the last
complete hour ``as_of − 1 h`` in the billing time zone: the run at 00:15 on the 1st estimates
the month that just ended, with all its hours (and then equals the invoice the close writes).

One transaction: :func:`billing.estimate.compute` (what the close would bill if the month ended
at ``as_of``, and the last complete day's profile carried forward to the month's end), then
:func:`billing.estimate.store` (the rows of this ``(period, as_of)`` replaced, so a rerun of the
hour leaves the table as the first run did), then :func:`billing.alerts.evaluate` on the stored
rows (a threshold crossed raises its event in the same transaction). Hours never snapshotted
count as zero and are not rebuilt here (the estimate only reads usage): they are counted in
``hours_missing`` and logged as ``estimate_hours_missing``.

One ``estimate_usage`` line per run (period, as_of, method, tenants, hours missing, projected
total); the counts go to ``job_finished`` as well.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import structlog

from billing import alerts, estimate
from jobs.runtime.context import JobContext
from metering.timeutil import floor_hour

__all__ = ["run"]


def run(ctx: JobContext, logical_time: datetime) -> dict[str, Any]:
    log = structlog.get_logger("hostmeter.estimate")
    zone = ctx.settings.zone
    as_of = floor_hour(logical_time)
    period = estimate.period_at(as_of, zone)
    now = ctx.clock()
    with ctx.engine.begin() as conn:
        missing = estimate.hours_missing(conn, period=period, as_of=as_of, zone=zone)
        estimates = estimate.compute(conn, period=period, as_of=as_of, zone=zone,
                                     missing=missing)
        stored = estimate.store(conn, estimates, computed_at=now, run_id=ctx.run_id,
                                period=period, as_of=as_of)
        rows = [
            {**row, "tenant": e.tenant}
            for e, row in zip(estimates, estimate.estimate_rows(
                estimates, computed_at=now, run_id=ctx.run_id), strict=True)
        ]
        alerted = alerts.evaluate(conn, period=period, as_of=as_of, estimates=rows, now=now,
                                  run_id=ctx.run_id, complete=True)
    method = estimates[0].method if estimates else estimate.profile(period, as_of, zone).method
    projected = sum(e.projected.total for e in estimates)
    counts: dict[str, Any] = {
        "period": period,
        "as_of": as_of.isoformat(),
        "method": method,
        "tenants": len(estimates),
        "rows_stored": stored,
        "hours_missing": len(missing),
        "mtd_total": sum(e.mtd.total for e in estimates),
        "projected_total": projected,
        **{k: int(v) for k, v in alerted.items()},
    }
    log.info("estimate_usage", **counts)
    return counts
