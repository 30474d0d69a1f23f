"""A short billing month for the billing tests: February 2026 (672 hours), a request for it, and
a tenant's fleet of hosts posting every hour of it (shared by several test modules)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from billing.service import BillingRequest
from metering.records import HostPost, PlanChange, Record
from metering.settings import Settings
from metering.timeutil import hours_between, month_bounds

ZONE = Settings().zone
PERIOD = "2026-02"  # 28 days: 672 hours, keeps the tests quick
START, END = month_bounds(PERIOD, ZONE)
AFTER = END + timedelta(hours=3)


def request(**kw: Any) -> BillingRequest:
    base: dict[str, Any] = dict(period=PERIOD, zone=ZONE, logical_time=AFTER,
                                actor="ops@billing-1", run_id=f"r-{datetime.now().timestamp()}",
                                now=datetime(2026, 3, 1, 0, 0, tzinfo=UTC))
    base.update(kw)
    return BillingRequest(**base)


def fleet(tenant: str, hosts: int, *, plan: str = "standard", start: datetime = START,
          end: datetime = END) -> list[Record]:
    recs: list[Record] = [PlanChange(tenant=tenant, plan=plan, at=START)]
    for h in hours_between(start, end):
        for i in range(hosts):
            recs.append(HostPost(tenant=tenant, host=f"{tenant}-{i}", kind="standard",
                                 at=h + timedelta(minutes=1), metrics=("cpu", "mem")))
    return recs
