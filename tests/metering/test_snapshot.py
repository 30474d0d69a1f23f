"""Hourly snapshots (``metering.snapshot``), against real databases.

The table below is the spec of one ``usage_snapshots`` row (BILLING_RULES.md §1) and of the
per-role rows: each case records usage through the ingest API, snapshots one hour and compares
*every* row of that hour (so a missing or an extra tenant/role fails as surely as a wrong count).
Scenarios are shared by several cases so that the hour before and after a boundary are checked
from the same records.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from metering import models as m
from metering.ingest import UsageRecorder
from metering.records import (
    AnomalyRole,
    HostPost,
    MonitorChange,
    PlanChange,
    Record,
    RoleMember,
    ServicePost,
    parse_line,
)
from metering.report import coverage
from metering.snapshot import (
    MetricLimits,
    SnapshotResult,
    TenantHour,
    expected_tenant_hours,
    missing_hours,
    snapshot_hour,
    snapshot_hours,
    tenant_hours,
)
from metering.timeutil import HOUR, month_bounds

# --- building records -------------------------------------------------------------------------


def at(hh: int, mm: int = 0, ss: int = 0, us: int = 0, *, day: int = 15) -> datetime:
    """An instant on 2026-10-<day> (UTC)."""
    return datetime(2026, 10, day, hh, mm, ss, us, tzinfo=UTC)


EARLY = at(0, day=1)  # long before every snapshotted hour
STAMP = datetime(2026, 10, 15, 12, 5, tzinfo=UTC)  # snapshotted_at in tests


def names(n: int, prefix: str = "m", start: int = 0) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in range(start, start + n))


def plan(tenant: str, name: str, when: datetime) -> PlanChange:
    return PlanChange(tenant=tenant, plan=name, at=when)


def post(
    tenant: str, host: str, when: datetime, metrics: Sequence[str], kind: str = "standard"
) -> HostPost:
    return HostPost(tenant=tenant, host=host, kind=kind, at=when, metrics=tuple(metrics))


def svc(tenant: str, service: str, when: datetime, metrics: Sequence[str]) -> ServicePost:
    return ServicePost(tenant=tenant, service=service, at=when, metrics=tuple(metrics))


def monitor(tenant: str, name: str, when: datetime, *, created: bool = True) -> MonitorChange:
    return MonitorChange(tenant=tenant, monitor=name, at=when, present=created)


def role(tenant: str, name: str, when: datetime, *, enabled: bool = True) -> AnomalyRole:
    return AnomalyRole(tenant=tenant, role=name, at=when, enabled=enabled)


def member(
    tenant: str, role_name: str, host: str, when: datetime, *, joined: bool = True
) -> RoleMember:
    return RoleMember(tenant=tenant, role=role_name, host=host, at=when, member=joined)


def record(engine: Engine, records: Sequence[Record | str]) -> None:
    """Record ``records``; a ``str`` is a JSON line parsed exactly as ``hostmeter ingest`` would."""
    parsed: list[Record] = []
    for lineno, rec in enumerate(records, start=1):
        if isinstance(rec, str):
            rec = parse_line(rec, line=lineno)
            assert rec is not None
        parsed.append(rec)
    UsageRecorder(engine).record(parsed)


# --- reading snapshots ------------------------------------------------------------------------


class Snap(NamedTuple):
    """The counted columns of one ``usage_snapshots`` row."""

    plan: str | None
    standard_hosts: int = 0
    micro_hosts: int = 0
    standard_overage: int = 0
    micro_overage: int = 0
    host_metrics: int = 0
    service_metrics: int = 0
    monitors: int = 0


def snapshot_rows(conn: Connection, hour: datetime) -> dict[str, Snap]:
    us, t = m.usage_snapshots, m.tenants
    rows = conn.execute(
        sa.select(t.c.key, *(us.c[c] for c in Snap._fields))
        .join(t, t.c.id == us.c.tenant_id)
        .where(us.c.hour == hour)
    )
    return {r[0]: Snap(*r[1:]) for r in rows}


def role_rows(conn: Connection, hour: datetime) -> dict[tuple[str, str], int]:
    ur, t = m.usage_snapshot_roles, m.tenants
    rows = conn.execute(
        sa.select(t.c.key, ur.c.role, ur.c.hosts)
        .join(t, t.c.id == ur.c.tenant_id)
        .where(ur.c.hour == hour)
    )
    return {(k, r): n for k, r, n in rows}


def snap(engine: Engine, hour: datetime, *, run_id: str = "run-1",
         limits: MetricLimits | None = None, stamp: datetime = STAMP) -> SnapshotResult:
    with engine.begin() as conn:
        return snapshot_hour(
            conn, hour, limits=limits or MetricLimits(), run_id=run_id, snapshotted_at=stamp
        )


def dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the snapshot tables, in a stable order."""
    out = {}
    with engine.connect() as conn:
        for table in (m.usage_snapshots, m.usage_snapshot_roles, m.snapshot_hours):
            rows = conn.execute(sa.select(table).order_by(*table.primary_key.columns))
            out[table.name] = [tuple(r) for r in rows]
    return out


# --- scenarios --------------------------------------------------------------------------------

DISTINCT = [
    plan("acme", "standard", EARLY),
    post("acme", "h-1", at(10, 0), ["cpu.user", "cpu.system"]),
    post("acme", "h-1", at(10, 20), ["cpu.system", "loadavg5"]),
    post("acme", "h-1", at(10, 40), ["cpu.user", "loadavg5", "memory.used"]),
    post("acme", "h-1", at(10, 40), ["cpu.user", "loadavg5", "memory.used"]),  # duplicate post
    post("acme", "h-2", at(10, 5), ["cpu.user"]),  # same name on another host counts there too
    post("acme", "h-1", at(9, 59, 59, 999999), ["disk.read", "disk.write"]),
    post("acme", "h-1", at(11, 0), ["net.rx"]),
    svc("acme", "web", at(10, 1), ["req.count", "req.latency"]),
    svc("acme", "web", at(10, 31), ["req.count", "req.errors"]),
    svc("acme", "batch", at(10, 50), ["jobs.done"]),
    # another tenant posting the same names is counted apart
    post("beta", "h-1", at(10, 30), ["cpu.user", "x.only.beta"]),
]

BOUNDARY = [
    plan("acme", "standard", EARLY),
    post("acme", "h-first", at(10, 0, 0, 0), ["a"]),
    post("acme", "h-last", at(10, 59, 59, 999000), ["a", "b"]),
    post("acme", "h-before", at(9, 59, 59, 999000), ["a"]),
    post("acme", "h-after", at(11, 0, 0, 0), ["a"]),
    # 19:59:59.999 in Tokyo is 10:59:59.999Z: the 10:00 UTC hour
    '{"type":"host_post","tenant":"acme","host":"h-jst","kind":"micro",'
    '"at":"2026-10-15T19:59:59.999+09:00","metrics":["a","b","c"]}',
]

STOPS = [
    plan("acme", "standard", EARLY),
    post("acme", "h-1", at(8, 10), ["cpu"]),
    post("acme", "h-1", at(9, 10), ["cpu"]),
    post("acme", "h-1", at(10, 10), ["cpu"]),
    post("acme", "h-2", at(8, 20), ["cpu", "mem"]),  # then stops posting (retired)
]

POWEROFF = [
    '{"type":"plan","tenant":"acme","plan":"standard","at":"2026-10-01T00:00:00+09:00"}',
    '{"type":"host_post","tenant":"acme","host":"h-off","kind":"standard","status":"poweroff",'
    '"at":"2026-10-15T10:03:00Z","metrics":["loadavg5","cpu.user"]}',
    '{"type":"host_post","tenant":"acme","host":"h-off-micro","kind":"micro",'
    '"status":"poweroff","at":"2026-10-15T10:07:00Z","metrics":["loadavg5"]}',
]

MON_CREATED_MID = [plan("acme", "standard", EARLY), monitor("acme", "m-1", at(10, 30))]
MON_CREATED_EDGE = [plan("acme", "standard", EARLY), monitor("acme", "m-1", at(11, 0))]
MON_DELETED_MID = [
    plan("acme", "standard", EARLY),
    monitor("acme", "m-1", at(8, 0)),
    monitor("acme", "m-1", at(10, 30), created=False),
]
MON_DELETED_EDGE = [
    plan("acme", "standard", EARLY),
    monitor("acme", "m-1", at(8, 0)),
    monitor("acme", "m-1", at(11, 0), created=False),
]
MON_DELETED_AFTER_EDGE = [
    plan("acme", "standard", EARLY),
    monitor("acme", "m-1", at(8, 0)),
    monitor("acme", "m-1", at(11, 0, 0, 1), created=False),
]
MON_SHORT_AND_RECREATED = [
    plan("acme", "standard", EARLY),
    monitor("acme", "m-short", at(10, 10)),
    monitor("acme", "m-short", at(10, 20), created=False),
    monitor("acme", "m-again", at(8, 0)),
    monitor("acme", "m-again", at(8, 30), created=False),
    monitor("acme", "m-again", at(10, 15)),
    monitor("acme", "m-again", at(10, 15)),  # duplicate event
    monitor("acme", "m-old", EARLY),
    monitor("acme", "m-twice", EARLY),
    monitor("acme", "m-twice", at(9, 0)),  # created again without a deletion: still one monitor
]

EVERY_HOUR = [post("acme", "h-1", at(h, 30), ["cpu"]) for h in (9, 10, 11)]
TRIAL_TO_STANDARD_EDGE = [
    plan("acme", "trial", EARLY), plan("acme", "standard", at(10, 0)), *EVERY_HOUR,
]
TRIAL_TO_STANDARD_MID = [
    plan("acme", "trial", EARLY), plan("acme", "standard", at(10, 30)), *EVERY_HOUR,
]
STANDARD_TO_FREE_EDGE = [
    plan("acme", "standard", EARLY), plan("acme", "free", at(10, 0)), *EVERY_HOUR,
]
STANDARD_TO_FREE_MID = [
    plan("acme", "standard", EARLY), plan("acme", "free", at(10, 30)), *EVERY_HOUR,
]
STANDARD_TO_FREE_JUST_AFTER_EDGE = [
    plan("acme", "standard", EARLY), plan("acme", "free", at(10, 0, 0, 1)), *EVERY_HOUR,
]
PLAN_EDGE_IN_TOKYO = [
    plan("acme", "trial", EARLY),
    '{"type":"plan","tenant":"acme","plan":"standard","at":"2026-10-15T19:00:00+09:00"}',
]

PATTERN_B = [
    plan("acme", "standard", EARLY),
    post("acme", "A", at(10, 3), names(401)),
    post("acme", "B", at(10, 3), names(180)),
    post("acme", "C", at(10, 3), names(50), kind="micro"),
    post("acme", "D", at(10, 3), names(20), kind="micro"),
    svc("acme", "web", at(10, 3), names(240, "svc")),
    *(monitor("acme", f"url-{i}", EARLY) for i in range(30)),
]
LIMIT_EDGES = [
    plan("acme", "standard", EARLY),
    post("acme", "std-200", at(10, 1), names(200)),
    post("acme", "std-201", at(10, 1), names(201)),
    post("acme", "micro-30", at(10, 1), names(30), kind="micro"),
    post("acme", "micro-31", at(10, 1), names(31), kind="micro"),
]
OVERAGE_ACROSS_POSTS = [
    plan("acme", "standard", EARLY),
    post("acme", "std", at(10, 5), names(150)),
    post("acme", "std", at(10, 35), names(150, start=100)),  # 250 distinct
    post("acme", "micro", at(10, 5), names(20), kind="micro"),
    post("acme", "micro", at(10, 35), names(20, start=15), kind="micro"),  # 35 distinct
    post("acme", "std", at(9, 5), names(300)),  # another hour
]
MICRO_ONLY_OVERAGE = [
    plan("acme", "standard", EARLY),
    post("acme", "tiny", at(10, 5), names(180), kind="micro"),
]
KIND_CHANGE_IN_HOUR = [
    plan("acme", "standard", EARLY),
    post("acme", "h-1", at(10, 5), names(40), kind="micro"),
    post("acme", "h-1", at(10, 35), names(10, start=40), kind="standard"),
]

ANOMALY = [
    plan("acme", "standard", EARLY),
    role("acme", "web:app", EARLY),
    *(member("acme", "web:app", f"web-{i}", EARLY) for i in range(1, 7)),
    *(post("acme", f"web-{i}", at(10, i), ["cpu"]) for i in range(1, 7)),
    member("acme", "web:app", "web-micro", EARLY),
    post("acme", "web-micro", at(10, 7), ["cpu"], kind="micro"),
    member("acme", "web:app", "web-silent", EARLY),
    post("acme", "web-silent", at(9, 7), ["cpu"]),  # posted, but not in the 10:00 hour
    post("acme", "not-a-member", at(10, 8), ["cpu"]),
    role("acme", "db:main", EARLY),
    member("acme", "db:main", "web-1", EARLY),
    role("acme", "db:main", at(9, 0), enabled=False),
    role("acme", "never", at(9, 0), enabled=False),
    member("acme", "never", "web-1", EARLY),
]
ROLE_TIMING = [
    plan("acme", "standard", EARLY),
    role("acme", "web", at(10, 30)),  # enabled mid-hour
    role("acme", "batch", EARLY),
    role("acme", "batch", at(9, 0)),  # enabled again while on: still one role
    role("acme", "batch", at(10, 30), enabled=False),  # disabled mid-hour
    role("acme", "edge", EARLY),
    role("acme", "edge", at(10, 0), enabled=False),  # disabled at the boundary
    member("acme", "web", "h-1", EARLY),
    member("acme", "web", "h-1", at(9, 0)),  # joins again while a member: still one host
    member("acme", "batch", "h-1", EARLY),
    member("acme", "edge", "h-1", EARLY),
    member("acme", "web", "h-2", at(10, 45)),  # joins mid-hour
    member("acme", "web", "h-3", EARLY),
    member("acme", "web", "h-3", at(9, 30), joined=False),  # left before the hour
    *(post("acme", h, at(hr, 15), ["cpu"]) for h in ("h-1", "h-2", "h-3") for hr in (9, 10, 11)),
]
CROSS_TENANT_HOST_KEYS = [
    plan("a", "standard", EARLY),
    role("a", "r", EARLY),
    member("a", "r", "h-1", EARLY),  # a's h-1 does not post
    role("b", "r", EARLY),
    member("b", "r", "h-1", EARLY),
    post("b", "h-1", at(10, 10), ["cpu"]),  # b's h-1 (another host) posts
]

IDLE = [
    plan("idle", "standard", EARLY),
    plan("busy", "trial", EARLY),
    post("busy", "h-1", at(10, 1), ["cpu"]),
]
NO_PLAN_NO_USAGE = [
    post("ghost", "h-1", at(8, 1), ["cpu"]),
    monitor("ghost", "m-1", at(7, 0)),
    monitor("ghost", "m-1", at(7, 30), created=False),
    plan("later", "standard", at(12, 0)),  # a plan that starts after the hour
    role("ghost", "r", at(9, 0)),
    role("ghost", "r", at(9, 0, 0, 1), enabled=False),
]
USAGE_NO_PLAN = [
    post("anon", "h-1", at(10, 1), names(3)),
    post("anon", "h-2", at(10, 2), names(2), kind="micro"),
    svc("anon", "web", at(10, 3), ["req"]),
    monitor("anon", "m-1", at(10, 4)),
    post("soon", "h-1", at(10, 1), ["cpu"]),
    plan("soon", "standard", at(11, 0)),  # starts with the next hour
]


@dataclass(frozen=True)
class Case:
    id: str
    records: Sequence[Record | str]
    hour: datetime
    rows: dict[str, Snap]
    roles: dict[tuple[str, str], int] = field(default_factory=dict)


STD = "standard"

CASES = [
    # distinct metric names per host-hour, across posts; services over all the tenant's services
    Case("distinct_metrics_across_posts", DISTINCT, at(10),
         {"acme": Snap(STD, standard_hosts=2, host_metrics=4 + 1, service_metrics=4),
          "beta": Snap(None, standard_hosts=1, host_metrics=2)}),
    Case("distinct_metrics_hour_before", DISTINCT, at(9),
         {"acme": Snap(STD, standard_hosts=1, host_metrics=2)}),
    Case("distinct_metrics_hour_after", DISTINCT, at(11),
         {"acme": Snap(STD, standard_hosts=1, host_metrics=1)}),
    # hour boundaries: [10:00:00, 11:00:00)
    Case("posts_at_00_00_and_59_59_999_count", BOUNDARY, at(10),
         {"acme": Snap(STD, standard_hosts=2, micro_hosts=1, host_metrics=1 + 2 + 3)}),
    Case("post_at_59_59_999_is_previous_hour", BOUNDARY, at(9),
         {"acme": Snap(STD, standard_hosts=1, host_metrics=1)}),
    Case("post_at_00_00_is_next_hour", BOUNDARY, at(11),
         {"acme": Snap(STD, standard_hosts=1, host_metrics=1)}),
    # a host counts in the hours it posted, not after it stopped
    Case("host_stops_posting_both_posted", STOPS, at(8),
         {"acme": Snap(STD, standard_hosts=2, host_metrics=3)}),
    Case("host_stops_posting_one_left", STOPS, at(9),
         {"acme": Snap(STD, standard_hosts=1, host_metrics=1)}),
    Case("host_stops_posting_none_left", STOPS, at(11), {"acme": Snap(STD)}),
    # status does not matter: a powered-off host that posts is active
    Case("poweroff_host_that_posts_is_active", POWEROFF, at(10),
         {"acme": Snap(STD, standard_hosts=1, micro_hosts=1, host_metrics=3)}),
    Case("poweroff_host_not_posting_is_not", POWEROFF, at(11), {"acme": Snap(STD)}),
    # monitors: counted in every hour their lifetime overlaps
    Case("monitor_created_mid_hour_counts", MON_CREATED_MID, at(10),
         {"acme": Snap(STD, monitors=1)}),
    Case("monitor_created_mid_hour_not_before", MON_CREATED_MID, at(9), {"acme": Snap(STD)}),
    Case("monitor_created_mid_hour_still_later", MON_CREATED_MID, at(11),
         {"acme": Snap(STD, monitors=1)}),
    Case("monitor_created_at_boundary_not_hour_before", MON_CREATED_EDGE, at(10),
         {"acme": Snap(STD)}),
    Case("monitor_created_at_boundary_counts", MON_CREATED_EDGE, at(11),
         {"acme": Snap(STD, monitors=1)}),
    Case("monitor_deleted_mid_hour_counts", MON_DELETED_MID, at(10),
         {"acme": Snap(STD, monitors=1)}),
    Case("monitor_deleted_mid_hour_not_next", MON_DELETED_MID, at(11), {"acme": Snap(STD)}),
    Case("monitor_deleted_at_boundary_counts_before", MON_DELETED_EDGE, at(10),
         {"acme": Snap(STD, monitors=1)}),
    Case("monitor_deleted_at_boundary_not_hour_starting_then", MON_DELETED_EDGE, at(11),
         {"acme": Snap(STD)}),
    Case("monitor_deleted_1us_after_boundary_counts", MON_DELETED_AFTER_EDGE, at(11),
         {"acme": Snap(STD, monitors=1)}),
    Case("monitor_deleted_1us_after_boundary_not_next", MON_DELETED_AFTER_EDGE, at(12),
         {"acme": Snap(STD)}),
    Case("monitors_short_lived_and_recreated", MON_SHORT_AND_RECREATED, at(10),
         {"acme": Snap(STD, monitors=4)}),
    Case("monitors_recreated_gap_hour", MON_SHORT_AND_RECREATED, at(9),
         {"acme": Snap(STD, monitors=2)}),
    Case("monitors_short_lived_gone_next_hour", MON_SHORT_AND_RECREATED, at(11),
         {"acme": Snap(STD, monitors=3)}),
    # plan in effect at the start of the hour
    Case("trial_to_standard_at_10_00_applies_to_10", TRIAL_TO_STANDARD_EDGE, at(10),
         {"acme": Snap(STD, standard_hosts=1, host_metrics=1)}),
    Case("trial_to_standard_at_10_00_not_to_09", TRIAL_TO_STANDARD_EDGE, at(9),
         {"acme": Snap("trial", standard_hosts=1, host_metrics=1)}),
    Case("trial_to_standard_at_10_30_not_to_10", TRIAL_TO_STANDARD_MID, at(10),
         {"acme": Snap("trial", standard_hosts=1, host_metrics=1)}),
    Case("trial_to_standard_at_10_30_applies_to_11", TRIAL_TO_STANDARD_MID, at(11),
         {"acme": Snap(STD, standard_hosts=1, host_metrics=1)}),
    Case("standard_to_free_at_10_00_applies_to_10", STANDARD_TO_FREE_EDGE, at(10),
         {"acme": Snap("free", standard_hosts=1, host_metrics=1)}),
    Case("standard_to_free_at_10_00_not_to_09", STANDARD_TO_FREE_EDGE, at(9),
         {"acme": Snap(STD, standard_hosts=1, host_metrics=1)}),
    Case("standard_to_free_at_10_30_not_to_10", STANDARD_TO_FREE_MID, at(10),
         {"acme": Snap(STD, standard_hosts=1, host_metrics=1)}),
    Case("standard_to_free_at_10_30_applies_to_11", STANDARD_TO_FREE_MID, at(11),
         {"acme": Snap("free", standard_hosts=1, host_metrics=1)}),
    Case("standard_to_free_1us_after_10_00_not_to_10", STANDARD_TO_FREE_JUST_AFTER_EDGE, at(10),
         {"acme": Snap(STD, standard_hosts=1, host_metrics=1)}),
    Case("plan_change_with_offset_at_boundary", PLAN_EDGE_IN_TOKYO, at(10),
         {"acme": Snap(STD)}),
    Case("plan_change_with_offset_not_hour_before", PLAN_EDGE_IN_TOKYO, at(9),
         {"acme": Snap("trial")}),
    # overage: per host above the limit, summed over hosts
    Case("overage_pattern_b", PATTERN_B, at(10),
         {"acme": Snap(STD, standard_hosts=2, micro_hosts=2, standard_overage=201,
                       micro_overage=20, host_metrics=401 + 180 + 50 + 20,
                       service_metrics=240, monitors=30)}),
    Case("overage_limits_exclusive", LIMIT_EDGES, at(10),
         {"acme": Snap(STD, standard_hosts=2, micro_hosts=2, standard_overage=1,
                       micro_overage=1, host_metrics=200 + 201 + 30 + 31)}),
    Case("overage_distinct_across_posts", OVERAGE_ACROSS_POSTS, at(10),
         {"acme": Snap(STD, standard_hosts=1, micro_hosts=1, standard_overage=50,
                       micro_overage=5, host_metrics=250 + 35)}),
    Case("overage_per_hour", OVERAGE_ACROSS_POSTS, at(9),
         {"acme": Snap(STD, standard_hosts=1, standard_overage=100, host_metrics=300)}),
    Case("micro_overage_uses_micro_limit", MICRO_ONLY_OVERAGE, at(10),
         {"acme": Snap(STD, micro_hosts=1, micro_overage=150, host_metrics=180)}),
    Case("standard_and_micro_in_one_hour_is_standard", KIND_CHANGE_IN_HOUR, at(10),
         {"acme": Snap(STD, standard_hosts=1, host_metrics=50)}),
    # anomaly detection: per enabled role, the active standard member hosts
    Case("anomaly_role_six_active_standard_members", ANOMALY, at(10),
         {"acme": Snap(STD, standard_hosts=7, micro_hosts=1, host_metrics=8)},
         {("acme", "web:app"): 6}),
    Case("anomaly_role_silent_member_counts_when_it_posts", ANOMALY, at(9),
         {"acme": Snap(STD, standard_hosts=1, host_metrics=1)},
         {("acme", "web:app"): 1}),
    Case("anomaly_roles_enabled_disabled_before", ROLE_TIMING, at(9),
         {"acme": Snap(STD, standard_hosts=3, host_metrics=3)},
         {("acme", "batch"): 1, ("acme", "edge"): 1}),
    Case("anomaly_roles_enabled_disabled_joined_mid_hour", ROLE_TIMING, at(10),
         {"acme": Snap(STD, standard_hosts=3, host_metrics=3)},
         {("acme", "web"): 2, ("acme", "batch"): 1}),
    Case("anomaly_roles_hour_after", ROLE_TIMING, at(11),
         {"acme": Snap(STD, standard_hosts=3, host_metrics=3)},
         {("acme", "web"): 2}),
    Case("anomaly_members_are_per_tenant", CROSS_TENANT_HOST_KEYS, at(10),
         {"a": Snap(STD), "b": Snap(None, standard_hosts=1, host_metrics=1)},
         {("a", "r"): 0, ("b", "r"): 1}),
    # which tenants get a row
    Case("plan_without_usage_is_a_row_of_zeros", IDLE, at(10),
         {"idle": Snap(STD), "busy": Snap("trial", standard_hosts=1, host_metrics=1)}),
    Case("no_plan_no_usage_no_row", NO_PLAN_NO_USAGE, at(10), {}),
    Case("no_plan_usage_in_its_own_hour", NO_PLAN_NO_USAGE, at(8),
         {"ghost": Snap(None, standard_hosts=1, host_metrics=1)}),
    Case("no_plan_monitor_in_its_own_hour", NO_PLAN_NO_USAGE, at(7),
         {"ghost": Snap(None, monitors=1)}),
    Case("usage_without_plan_has_plan_null", USAGE_NO_PLAN, at(10),
         {"anon": Snap(None, standard_hosts=1, micro_hosts=1, host_metrics=5,
                       service_metrics=1, monitors=1),
          "soon": Snap(None, standard_hosts=1, host_metrics=1)}),
]


# One database per scenario (creating a PostgreSQL database costs more than a case): the cases
# that share a scenario's records are snapshotted one after the other in it, which also shows
# that snapshotting one hour leaves the other hours alone.
SCENARIOS: dict[str, Sequence[Record | str]] = {
    "distinct": DISTINCT,
    "boundary": BOUNDARY,
    "stops": STOPS,
    "poweroff": POWEROFF,
    "monitor_created_mid": MON_CREATED_MID,
    "monitor_created_edge": MON_CREATED_EDGE,
    "monitor_deleted_mid": MON_DELETED_MID,
    "monitor_deleted_edge": MON_DELETED_EDGE,
    "monitor_deleted_after_edge": MON_DELETED_AFTER_EDGE,
    "monitors_short_and_recreated": MON_SHORT_AND_RECREATED,
    "trial_to_standard_edge": TRIAL_TO_STANDARD_EDGE,
    "trial_to_standard_mid": TRIAL_TO_STANDARD_MID,
    "standard_to_free_edge": STANDARD_TO_FREE_EDGE,
    "standard_to_free_mid": STANDARD_TO_FREE_MID,
    "standard_to_free_just_after_edge": STANDARD_TO_FREE_JUST_AFTER_EDGE,
    "plan_edge_in_tokyo": PLAN_EDGE_IN_TOKYO,
    "pattern_b": PATTERN_B,
    "limit_edges": LIMIT_EDGES,
    "overage_across_posts": OVERAGE_ACROSS_POSTS,
    "micro_only_overage": MICRO_ONLY_OVERAGE,
    "kind_change_in_hour": KIND_CHANGE_IN_HOUR,
    "anomaly": ANOMALY,
    "role_timing": ROLE_TIMING,
    "cross_tenant_host_keys": CROSS_TENANT_HOST_KEYS,
    "idle": IDLE,
    "no_plan_no_usage": NO_PLAN_NO_USAGE,
    "usage_no_plan": USAGE_NO_PLAN,
}


def cases_of(scenario: str) -> list[Case]:
    return [c for c in CASES if c.records is SCENARIOS[scenario]]


def test_every_case_belongs_to_one_scenario() -> None:
    assert sum(len(cases_of(s)) for s in SCENARIOS) == len(CASES)
    assert len({c.id for c in CASES}) == len(CASES)
    for s in SCENARIOS:  # one snapshot per hour and scenario, so the hours are distinct
        hours = [c.hour for c in cases_of(s)]
        assert hours and len(set(hours)) == len(hours), s


def _summary(result: SnapshotResult) -> tuple[datetime, int, int, int, int, int]:
    return (result.hour, result.tenants, result.roles, result.standard_hosts,
            result.micro_hosts, result.host_metrics)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_snapshot_hour(engine: Engine, scenario: str) -> None:
    record(engine, SCENARIOS[scenario])
    actual: dict[str, Any] = {}
    expected: dict[str, Any] = {}

    for case in cases_of(scenario):
        result = snap(engine, case.hour)
        with engine.connect() as conn:
            actual[case.id] = (
                snapshot_rows(conn, case.hour), role_rows(conn, case.hour), _summary(result)
            )
        rows = case.rows.values()
        expected[case.id] = (case.rows, case.roles, (
            case.hour, len(case.rows), len(case.roles), sum(r.standard_hosts for r in rows),
            sum(r.micro_hosts for r in rows), sum(r.host_metrics for r in rows),
        ))

    assert actual == expected  # the diff names the failing case
    with engine.connect() as conn:  # nothing was written outside the snapshotted hours
        for table, n in ((m.usage_snapshots, sum(len(c.rows) for c in cases_of(scenario))),
                         (m.usage_snapshot_roles, sum(len(c.roles) for c in cases_of(scenario)))):
            assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == n


def test_limits_come_from_the_caller_and_are_recorded(engine: Engine) -> None:
    record(engine, PATTERN_B)

    snap(engine, at(10), limits=MetricLimits(standard=400, micro=40))

    us = m.usage_snapshots
    with engine.connect() as conn:
        assert snapshot_rows(conn, at(10))["acme"][3:5] == (1, 10)  # 401-400, 50-40
        limits = conn.execute(
            sa.select(us.c.standard_metric_limit, us.c.micro_metric_limit)
        ).one()
    assert tuple(limits) == (400, 40)


def test_default_limits_are_recorded(engine: Engine) -> None:
    record(engine, PATTERN_B)
    snap(engine, at(10))
    us = m.usage_snapshots
    with engine.connect() as conn:
        row = conn.execute(sa.select(us.c.standard_metric_limit, us.c.micro_metric_limit)).one()
    assert tuple(row) == (200, 30)


def test_an_instant_inside_the_hour_snapshots_that_hour(engine: Engine) -> None:
    record(engine, DISTINCT)

    result = snap(engine, at(10, 37, 12, 345))

    assert result.hour == at(10)
    with engine.connect() as conn:
        assert conn.execute(sa.select(m.usage_snapshots.c.hour).distinct()).scalars().all() == [
            at(10)
        ]
        assert snapshot_rows(conn, at(10))["acme"].host_metrics == 5


def test_snapshot_hours_records_the_run(engine: Engine) -> None:
    record(engine, IDLE)

    snap(engine, at(10), run_id="run-a", stamp=STAMP)

    with engine.connect() as conn:
        row = conn.execute(sa.select(m.snapshot_hours)).one()
    assert dict(row._mapping) == {"hour": at(10), "snapshotted_at": STAMP, "run_id": "run-a",
                            "tenants": 2}


# --- re-running -------------------------------------------------------------------------------

RICH = [*PATTERN_B, *ROLE_TIMING[1:], *MON_SHORT_AND_RECREATED[1:], *USAGE_NO_PLAN, *IDLE,
        plan("acme", "free", at(11, 0))]
RICH_HOURS = [at(h) for h in range(8, 13)]


def test_rerunning_an_hour_reproduces_identical_rows(engine: Engine) -> None:
    record(engine, RICH)
    for hour in RICH_HOURS:
        snap(engine, hour, run_id="first")
    first = dump(engine)
    assert len(first["usage_snapshots"]) > len(RICH_HOURS)  # the scenario is not trivial
    assert first["usage_snapshot_roles"]

    for hour in reversed(RICH_HOURS):  # another order, another run, a later clock
        snap(engine, hour, run_id="second", stamp=STAMP + timedelta(days=1))
    second = dump(engine)

    assert second["usage_snapshots"] == first["usage_snapshots"]
    assert second["usage_snapshot_roles"] == first["usage_snapshot_roles"]
    # the ledger of covered hours is the same; only its audit columns say who re-ran it
    assert [(r[0], r[3]) for r in second["snapshot_hours"]] == [
        (r[0], r[3]) for r in first["snapshot_hours"]
    ]
    assert {r[2] for r in second["snapshot_hours"]} == {"second"}


def test_rerunning_with_same_run_and_stamp_changes_nothing(engine: Engine) -> None:
    record(engine, RICH)
    for hour in RICH_HOURS:
        snap(engine, hour)
    first = dump(engine)
    for hour in RICH_HOURS:
        snap(engine, hour)
    assert dump(engine) == first


def test_ingesting_again_then_resnapshot_changes_nothing(engine: Engine) -> None:
    record(engine, RICH)
    snap(engine, at(10))
    first = dump(engine)
    record(engine, RICH)  # the same records delivered twice
    snap(engine, at(10))
    assert dump(engine) == first


def test_late_usage_changes_the_row_on_resnapshot(engine: Engine) -> None:
    record(engine, [
        plan("acme", "trial", EARLY),
        post("acme", "h-1", at(10, 5), ["cpu", "mem"]),
        post("acme", "h-1", at(9, 5), ["cpu"]),
    ])
    for hour in (at(9), at(10)):
        snap(engine, hour)
    with engine.connect() as conn:
        assert snapshot_rows(conn, at(10)) == {
            "acme": Snap("trial", standard_hosts=1, host_metrics=2)
        }
        hour_9 = snapshot_rows(conn, at(9))

    record(engine, [  # arrive after the snapshot, all about the 10:00 hour
        plan("acme", "standard", at(10, 0)),
        post("acme", "h-1", at(10, 55), ["mem", "disk"]),
        post("acme", "h-2", at(10, 59, 59, 999999), names(205)),
        post("acme", "h-m", at(10, 50), names(31), kind="micro"),
        svc("acme", "web", at(10, 40), ["req"]),
        monitor("acme", "m-1", at(10, 40)),
        role("acme", "web", at(10, 0)),
        member("acme", "web", "h-2", at(10, 0)),
        post("acme", "h-3", at(11, 0), ["cpu"]),  # the next hour: not in the 10:00 row
    ])
    with engine.connect() as conn:  # the frozen row does not move by itself
        assert snapshot_rows(conn, at(10))["acme"] == Snap("trial", 1, host_metrics=2)

    snap(engine, at(10), run_id="late")

    with engine.connect() as conn:
        assert snapshot_rows(conn, at(10)) == {
            "acme": Snap(STD, standard_hosts=2, micro_hosts=1, standard_overage=5,
                         micro_overage=1, host_metrics=3 + 205 + 31, service_metrics=1,
                         monitors=1)
        }
        assert role_rows(conn, at(10)) == {("acme", "web"): 1}
        assert snapshot_rows(conn, at(9)) == hour_9


def test_resnapshot_drops_rows_that_no_longer_apply(engine: Engine) -> None:
    record(engine, [
        role("acme", "web", EARLY),
        monitor("acme", "m-1", at(9, 0)),
    ])
    snap(engine, at(10))
    with engine.connect() as conn:
        assert snapshot_rows(conn, at(10)) == {"acme": Snap(None, monitors=1)}
        assert role_rows(conn, at(10)) == {("acme", "web"): 0}

    # late news: both were switched off exactly when the hour started
    record(engine, [
        role("acme", "web", at(10, 0), enabled=False),
        monitor("acme", "m-1", at(10, 0), created=False),
    ])
    snap(engine, at(10))

    with engine.connect() as conn:
        assert snapshot_rows(conn, at(10)) == {}
        assert role_rows(conn, at(10)) == {}
        assert conn.execute(sa.select(m.snapshot_hours.c.tenants)).scalar_one() == 0


def test_concurrent_snapshots_of_one_hour_do_not_collide(engine: Engine, backend: str) -> None:
    record(engine, RICH)
    snap(engine, at(10))
    expected = dump(engine)
    workers = 4
    barrier = threading.Barrier(workers, timeout=30)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            if backend == "sqlite":  # BEGIN IMMEDIATE: a second transaction cannot even open
                barrier.wait()
                snap(engine, at(10))
                return
            with engine.begin() as conn:
                barrier.wait()  # every transaction is open before any of them snapshots
                snapshot_hour(conn, at(10), limits=MetricLimits(), run_id="run-1",
                              snapshotted_at=STAMP)
        except BaseException as exc:  # reported below, with the thread's traceback
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert dump(engine) == expected


# --- what was written, and what should have been ----------------------------------------------

# Monitors created and deleted at one instant (the deletion wins from that instant on), alone
# (no plan): inside an hour, and on an hour's boundary; a role alone gives no row.
SAME_INSTANT = [
    monitor("blink", "m-1", at(10, 30)),
    monitor("blink", "m-1", at(10, 30), created=False),
    monitor("edge", "m-1", at(10, 0)),
    monitor("edge", "m-1", at(10, 0), created=False),
    monitor("late", "m-1", at(9, 0)),
    monitor("late", "m-1", at(11, 0), created=False),
    monitor("late", "m-1", at(11, 0)),  # created again at the instant of its deletion
    role("roles-only", "r", EARLY),
]
EXPECTED_SCENARIOS = {**SCENARIOS, "same_instant": SAME_INSTANT, "rich": RICH}
CONTIGUOUS = [at(h) for h in range(6, 14)]
SCATTERED = [at(7), at(9), at(10), at(12)]


@pytest.mark.parametrize("hours", [CONTIGUOUS, SCATTERED], ids=["contiguous", "scattered"])
@pytest.mark.parametrize("scenario", list(EXPECTED_SCENARIOS))
def test_expected_tenant_hours_are_the_rows_the_snapshot_writes(
        engine: Engine, scenario: str, hours: list[datetime]) -> None:
    """The completeness count, from its own statement, agrees with the snapshot on every rule
    (every boundary case of the table above), hour by hour and for the hours together."""
    record(engine, EXPECTED_SCENARIOS[scenario])
    with engine.begin() as conn:
        per_hour = [expected_tenant_hours(conn, [h]) for h in hours]
        together = expected_tenant_hours(conn, hours)
        snapshot_hours(conn, hours, limits=MetricLimits(), run_id="r", snapshotted_at=STAMP)
        written = tenant_hours(conn, hours)
        rows = [len(snapshot_rows(conn, h)) for h in hours]
    assert per_hour == rows
    assert together == sum(rows) == len(written)


def test_expected_tenant_hours_of_the_same_instant_cases(engine: Engine) -> None:
    record(engine, SAME_INSTANT)
    with engine.connect() as conn:
        assert [expected_tenant_hours(conn, [at(h)]) for h in (9, 10, 11, 12)] == [
            1,  # late
            2,  # blink (created in the hour), late; not edge (deleted at the hour's start)
            0,  # late deleted and created again at 11:00 sharp: the deletion wins
            0,
        ]
        assert expected_tenant_hours(conn, []) == 0


def test_tenant_hours_reads_back_the_rows_with_their_keys(engine: Engine) -> None:
    record(engine, [*PATTERN_B, *IDLE[:2], *USAGE_NO_PLAN[:3]])
    with engine.begin() as conn:
        snapshot_hours(conn, [at(10), at(9)], limits=MetricLimits(), run_id="r",
                       snapshotted_at=STAMP)
        rows = tenant_hours(conn, [at(9), at(10)])
    assert rows == [
        TenantHour("acme", at(9), STD, 0, 0, 0, 0, 0, 30),
        TenantHour("busy", at(9), "trial", 0, 0, 0, 0, 0, 0),
        TenantHour("idle", at(9), STD, 0, 0, 0, 0, 0, 0),
        TenantHour("acme", at(10), STD, 2, 2, 401 + 180 + 50 + 20, 201 + 20, 240, 30),
        TenantHour("anon", at(10), None, 1, 1, 5, 0, 1, 0),
        TenantHour("busy", at(10), "trial", 0, 0, 0, 0, 0, 0),
        TenantHour("idle", at(10), STD, 0, 0, 0, 0, 0, 0),
    ]
    assert all(r.hour.utcoffset() == timedelta(0) for r in rows)


# --- gaps versus zero usage -------------------------------------------------------------------


def test_missing_hours_tells_a_gap_from_zero_usage(engine: Engine) -> None:
    record(engine, [post("acme", "h-1", at(8, 30), ["cpu"])])
    snap(engine, at(8))
    snap(engine, at(10))  # acme had no usage then: a covered hour without an acme row

    with engine.connect() as conn:
        assert missing_hours(conn, at(7), at(12)) == [at(7), at(9), at(11)]
        assert coverage(conn, at(7), at(12)) == 2
        assert snapshot_rows(conn, at(8)) == {"acme": Snap(None, 1, host_metrics=1)}
        assert snapshot_rows(conn, at(10)) == {}  # zero usage ...
        assert snapshot_rows(conn, at(9)) == {}  # ... looks like a gap in usage_snapshots,
        covered = conn.execute(
            sa.select(m.snapshot_hours.c.hour, m.snapshot_hours.c.tenants)
            .order_by(m.snapshot_hours.c.hour)
        ).all()
    assert [tuple(r) for r in covered] == [(at(8), 1), (at(10), 0)]  # ... but not in the ledger

    snap(engine, at(9))
    snap(engine, at(9))  # re-snapshotting does not add a second ledger row
    with engine.connect() as conn:
        assert missing_hours(conn, at(7), at(12)) == [at(7), at(11)]
        assert coverage(conn, at(7), at(12)) == 3


def test_missing_hours_of_a_tokyo_month(engine: Engine) -> None:
    start, end = month_bounds("2026-10", ZoneInfo("Asia/Tokyo"))
    assert start == datetime(2026, 9, 30, 15, tzinfo=UTC)
    snap(engine, start)
    snap(engine, end - HOUR)
    snap(engine, end)  # the first hour of the next month is not part of this one

    with engine.connect() as conn:
        gaps = missing_hours(conn, start, end)
    assert len(gaps) == 744 - 2
    assert gaps[0] == start + HOUR
    assert gaps[-1] == end - 2 * HOUR
    assert all(g.utcoffset() == timedelta(0) for g in gaps)


def test_missing_hours_accepts_bounds_with_an_offset(engine: Engine) -> None:
    snap(engine, at(10))
    tokyo = ZoneInfo("Asia/Tokyo")
    with engine.connect() as conn:
        gaps = missing_hours(conn, at(9).astimezone(tokyo), at(12).astimezone(tokyo))
    assert gaps == [at(9), at(11)]
