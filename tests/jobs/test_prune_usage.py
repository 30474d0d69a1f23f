"""prune-usage: raw hours past retention go, snapshots stay and are never recomputed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billing.service import BillingRequest, close_period, rerun_period
from jobs import prune_usage
from jobs.triggers.runner import RunRequest, execute
from metering import models as m
from metering.errors import ConfigError
from metering.ingest import UsageRecorder
from metering.records import HostPost, PlanChange, ServicePost
from metering.settings import Settings
from metering.timeutil import hours_between, month_bounds

ZONE = Settings().zone
SEPT = month_bounds("2026-09", ZONE)
OCT = month_bounds("2026-10", ZONE)


def seed(engine: Engine) -> None:
    recs = [PlanChange(tenant="acme", plan="standard", at=SEPT[0])]
    for start, end in (SEPT, OCT):
        for h in hours_between(start, end):
            recs.append(HostPost(tenant="acme", host="h-1", kind="standard",
                                 at=h + timedelta(minutes=1), metrics=("cpu",)))
            recs.append(ServicePost(tenant="acme", service="web", at=h, metrics=("req",)))
    UsageRecorder(engine).record(recs)


def count(engine: Engine, table: sa.Table, start: datetime, end: datetime) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(
            table.c.hour >= start, table.c.hour < end)).scalar_one())


def test_cutoff_is_the_start_of_a_billing_month() -> None:
    at = datetime(2027, 11, 5, 4, 30, tzinfo=UTC)
    assert prune_usage.cutoff(at, 400, ZONE) == datetime(2026, 9, 30, 15, 0, tzinfo=UTC)


def test_prune_keeps_unsnapshotted_hours_and_freezes_snapshots(engine: Engine,
                                                              db_url: str) -> None:
    settings = Settings(database_url=db_url)
    seed(engine)
    req = BillingRequest(period="2026-09", zone=ZONE, logical_time=OCT[1], actor="t@h",
                         run_id="close-sep", now=OCT[1])
    close_period(engine, req)  # snapshots every hour of September (not October)
    before = count(engine, m.usage_snapshots, *SEPT)

    # 400 days after late October 2026 the cut-off is the start of October (Tokyo).
    at = datetime(2027, 11, 20, 4, 30, tzinfo=UTC)
    out = execute(engine, settings, RunRequest(job="prune-usage", scheduled_time=at))
    assert out.status == "succeeded" and out.counts["cutoff"] == OCT[0].isoformat()
    assert out.counts["host_hours_deleted"] == 720 and out.counts["service_hours_deleted"] == 720
    assert count(engine, m.host_hours, *SEPT) == 0
    assert count(engine, m.host_hours, *OCT) == 744  # never snapshotted: kept
    assert count(engine, m.usage_snapshots, *SEPT) == before

    # A rerun of September keeps the frozen snapshots instead of writing zeros over them.
    rerun = rerun_period(engine, BillingRequest(period="2026-09", zone=ZONE,
                                                logical_time=OCT[1], actor="t@h",
                                                run_id="rerun-sep", now=OCT[1]))
    assert rerun.rebuilt_hours == 0
    assert [t.action for t in rerun.tenants] == ["unchanged"]
    with engine.connect() as conn:
        hosts = conn.execute(sa.select(sa.func.sum(m.usage_snapshots.c.standard_hosts)).where(
            m.usage_snapshots.c.hour >= SEPT[0], m.usage_snapshots.c.hour < SEPT[1])
        ).scalar_one()
    assert hosts == 720

    # So does a backfill through the snapshot job.
    back = execute(engine, settings, RunRequest(
        job="snapshot-usage", scheduled_time=SEPT[0], trigger="backfill",
        options={"hours": list(hours_between(*SEPT))}))
    assert back.counts["kept_pruned_hours"] == 720 and back.counts["tenant_hours"] == 0
    assert count(engine, m.usage_snapshots, *SEPT) == before

    again = execute(engine, settings, RunRequest(job="prune-usage", scheduled_time=at,
                                                 force=True))
    assert again.counts["host_hours_deleted"] == 0


@pytest.mark.parametrize("value", ["10", "abc", "-5"])
def test_retention_setting_is_validated(value: str) -> None:
    with pytest.raises(ConfigError, match="HOSTMETER_RETENTION_DAYS"):
        Settings.from_env({"HOSTMETER_RETENTION_DAYS": value})
    assert Settings.from_env({"HOSTMETER_RETENTION_DAYS": "800"}).retention_days == 800


def test_prune_thins_the_hourly_estimates_of_months_before_the_previous(
        engine: Engine, db_url: str) -> None:
    from billing import notices as n

    settings = Settings(database_url=db_url)
    seed(engine)
    close_period(engine, BillingRequest(period="2026-09", zone=ZONE, logical_time=OCT[1],
                                        actor="t@h", run_id="close-sep", now=OCT[1]))
    for at in (SEPT[0] + timedelta(days=9, minutes=15), SEPT[0] + timedelta(days=9, hours=1,
                                                                              minutes=15)):
        ran = execute(engine, settings, RunRequest(job="estimate-usage", scheduled_time=at))
        assert ran.status == "succeeded" and ran.counts["rows_stored"] == 1

    # In October the previous month is September: every hour of it stays.
    early = execute(engine, settings, RunRequest(
        job="prune-usage", scheduled_time=datetime(2026, 10, 20, 4, 30, tzinfo=UTC)))
    assert early.status == "succeeded" and early.counts["estimates_thinned"] == 0
    # In November the previous month is October: September keeps its last estimate only.
    out = execute(engine, settings, RunRequest(
        job="prune-usage", scheduled_time=datetime(2026, 11, 20, 4, 30, tzinfo=UTC)))
    assert out.status == "succeeded" and out.counts["estimates_thinned"] == 1
    ue = n.usage_estimates
    with engine.connect() as conn:
        kept = conn.execute(sa.select(ue.c.period, ue.c.as_of).order_by(ue.c.as_of)).all()
    assert [tuple(r) for r in kept] == [("2026-09", SEPT[0] + timedelta(days=9, hours=1))]
