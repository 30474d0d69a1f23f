"""A deterministic synthetic fleet for ``hostmeter demo`` and tests.

:func:`demo_fleet` returns tenants of varied shape for one billing month: the two worked examples
of BILLING_RULES.md, hosts over the metric limit, service metrics, URL monitors, an
anomaly-detection role, a mid-month signup, a trial that converts, a free tenant under and one
over the free host limit, micro-only, monitors-only, autoscaling and a host that stops posting.
The same seed gives the same records, so the demo's numbers are reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from metering.records import (
    AnomalyRole,
    HostPost,
    MonitorChange,
    PlanChange,
    Record,
    RoleMember,
    ServicePost,
)
from metering.timeutil import HOUR, hours_between, month_bounds

__all__ = ["FleetHost", "FleetTenant", "demo_fleet", "metric_names"]

_REAL = (
    "loadavg1", "loadavg5", "loadavg15", "cpu.user.percentage", "cpu.system.percentage",
    "cpu.iowait.percentage", "cpu.idle.percentage", "memory.used", "memory.free",
    "memory.cached", "memory.swap_used", "disk.sda.reads.delta", "disk.sda.writes.delta",
    "interface.eth0.rxBytes.delta", "interface.eth0.txBytes.delta", "filesystem.root.size",
    "filesystem.root.used",
)


def metric_names(count: int, prefix: str = "custom.app") -> tuple[str, ...]:
    """``count`` distinct metric names: the usual agent metrics, then custom ones."""
    names = list(_REAL[:count])
    names += [f"{prefix}.metric{i:04d}" for i in range(count - len(names))]
    return tuple(names)


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetHost:
    """One host: posts ``metrics`` every hour in ``[start, end)`` (when ``active_hours``)."""

    key: str
    kind: str
    metrics: int
    start: datetime
    end: datetime
    business_hours_only: bool = False
    split_posts: bool = False


@dataclass(slots=True, kw_only=True)
class FleetTenant:
    """One tenant's shape for the month."""

    key: str
    shape: str
    plans: list[tuple[datetime, str]]
    hosts: list[FleetHost] = field(default_factory=list)
    service_metrics: int = 0
    monitors: list[tuple[str, datetime, datetime | None]] = field(default_factory=list)
    roles: list[tuple[str, list[str]]] = field(default_factory=list)

    def records(self, zone: ZoneInfo) -> Iterator[Record]:
        for at, plan in self.plans:
            yield PlanChange(tenant=self.key, plan=plan, at=at)
        for name, created, deleted in self.monitors:
            yield MonitorChange(tenant=self.key, monitor=name, at=created, present=True)
            if deleted is not None:
                yield MonitorChange(tenant=self.key, monitor=name, at=deleted, present=False)
        for role, members in self.roles:
            first = self.plans[0][0]
            yield AnomalyRole(tenant=self.key, role=role, at=first, enabled=True)
            for member in members:
                yield RoleMember(tenant=self.key, role=role, host=member, at=first, member=True)
        service = metric_names(self.service_metrics, "svc.web") if self.service_metrics else ()
        for host in self.hosts:
            names = metric_names(host.metrics)
            half = len(names) // 2
            first_post, second_post = names[: half + 5], names[max(0, half - 5) :]
            for hour in hours_between(host.start, host.end):
                if host.business_hours_only:
                    local = hour.astimezone(zone)
                    if local.weekday() >= 5 or not 9 <= local.hour < 18:
                        continue
                if host.split_posts:
                    # Two posts in the hour, overlapping: the first at hh:00:00, the last at
                    # hh:59:59.999; only distinct names count.
                    yield HostPost(tenant=self.key, host=host.key, kind=host.kind,
                                   at=hour, metrics=first_post)
                    yield HostPost(tenant=self.key, host=host.key, kind=host.kind,
                                   at=hour + HOUR - timedelta(milliseconds=1),
                                   metrics=second_post)
                else:
                    yield HostPost(tenant=self.key, host=host.key, kind=host.kind,
                                   at=hour + timedelta(minutes=3), metrics=names)
        if service:
            start = min(at for at, _ in self.plans)
            end = max((h.end for h in self.hosts), default=start)
            for hour in hours_between(start, end):
                yield ServicePost(tenant=self.key, service="web", at=hour + timedelta(minutes=1),
                                  metrics=service)


def demo_fleet(
    period: str, zone: ZoneInfo, *, seed: int = 1, tenants: int = 36
) -> list[FleetTenant]:
    """The demo's tenants for ``period`` (at least the dozen named shapes)."""
    rng = random.Random(seed)
    start, end = month_bounds(period, zone)
    local_start = start.astimezone(zone)

    def day(n: int, hour: int = 0, minute: int = 0) -> datetime:
        return (local_start + timedelta(days=n - 1, hours=hour, minutes=minute)).astimezone(
            start.tzinfo
        )

    def host(key: str, kind: str, metrics: int, **kw: object) -> FleetHost:
        return FleetHost(key=key, kind=kind, metrics=metrics,
                         start=kw.pop("start", start), end=kw.pop("end", end), **kw)  # type: ignore[arg-type]

    std = [(start, "standard")]
    out = [
        FleetTenant(key="acme", shape="worked example B", plans=std, service_metrics=240,
                    hosts=[host("acme-a", "standard", 401, split_posts=True),
                           host("acme-b", "standard", 180), host("acme-c", "micro", 50)],
                    monitors=[(f"url-{i}", start, None) for i in range(30)]),
        FleetTenant(key="globex", shape="worked example A", plans=std, service_metrics=90,
                    hosts=[host("globex-a", "standard", 180), host("globex-b", "standard", 180),
                           host("globex-c", "micro", 20)],
                    monitors=[(f"url-{i}", start, None) for i in range(19)]),
        FleetTenant(key="initech", shape="exactly 3 hosts", plans=std,
                    hosts=[host(f"initech-{i}", "standard", 120) for i in range(3)]),
        FleetTenant(key="umbrella", shape="autoscaling (business hours)", plans=std,
                    hosts=[host(f"umbrella-base-{i}", "standard", 150) for i in range(2)]
                    + [host(f"umbrella-burst-{i}", "standard", 150, business_hours_only=True)
                       for i in range(3)]),
        FleetTenant(key="hooli", shape="anomaly detection role", plans=std,
                    hosts=[host(f"hooli-web-{i}", "standard", 90) for i in range(6)],
                    roles=[("web:app", [f"hooli-web-{i}" for i in range(6)])]),
        FleetTenant(key="stark", shape="mid-month signup", plans=[(day(15), "standard")],
                    hosts=[host(f"stark-{i}", "standard", 100, start=day(15)) for i in range(5)]),
        FleetTenant(key="wayne", shape="trial, then standard", plans=[(start, "trial"),
                                                                    (day(10), "standard")],
                    hosts=[host(f"wayne-{i}", "standard", 60) for i in range(4)]),
        FleetTenant(key="tyrell", shape="free, under the limit", plans=[(start, "free")],
                    hosts=[host(f"tyrell-{i}", "standard", 40) for i in range(3)]),
        FleetTenant(key="cyberdyne", shape="free, over the limit", plans=[(start, "free")],
                    hosts=[host(f"cyberdyne-{i}", "standard", 40) for i in range(7)]),
        FleetTenant(key="soylent", shape="micro hosts only", plans=std,
                    hosts=[host(f"soylent-{i}", "micro", 25) for i in range(3)]),
        FleetTenant(key="oscorp", shape="URL monitors only (minimum charge)", plans=std,
                    monitors=[(f"url-{i}", start, None) for i in range(15)]
                    + [("url-temp", day(3, 10, 30), day(12, 10, 30))]),
        FleetTenant(key="vandelay", shape="a host that stops posting", plans=std,
                    hosts=[host("vandelay-1", "standard", 210),
                           host("vandelay-2", "standard", 210, end=day(20, 13))]),
    ]
    for i in range(len(out), tenants):
        n_std = rng.randint(1, 12)
        n_micro = rng.choice((0, 0, 0, 1, 2, 4))
        hosts = [host(f"t{i:02d}-s{j}", "standard", rng.randint(60, 260)) for j in range(n_std)]
        hosts += [host(f"t{i:02d}-u{j}", "micro", rng.randint(10, 45)) for j in range(n_micro)]
        out.append(
            FleetTenant(
                key=f"tenant-{i:02d}",
                shape="random standard",
                plans=std,
                hosts=hosts,
                service_metrics=rng.choice((0, 0, 50, 150, 260)),
                monitors=[(f"url-{k}", start, None) for k in range(rng.choice((0, 3, 10, 24)))],
            )
        )
    return out
