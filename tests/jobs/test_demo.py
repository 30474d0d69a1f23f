"""``hostmeter demo`` end to end, as a new user runs it, on every backend."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from metering import db
from metering import models as m


def _hostmeter(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def _row(stdout: str, tenant: str) -> list[str]:
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0] == tenant:
            return cells
    raise AssertionError(f"no row for {tenant} in:\n{stdout}")


def test_demo_prints_the_usage_summary_and_is_idempotent(db_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "HOSTMETER_DATABASE_URL": db_url,
           "HOSTMETER_LOG_DIR": str(tmp_path / "logs")}
    first = _hostmeter("demo", "--tenants", "12", "--period", "2026-10", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    # columns: tenant, shape, plan, paid h, std hosts, micro hosts, std overage, micro overage,
    # svc metrics, monitors (averages over all 744 hours of October 2026 in Asia/Tokyo)
    assert _row(first.stdout, "acme")[2:] == [
        "standard", "744", "2.00", "1.00", "201.00", "20.00", "240.00", "30.00"]
    assert _row(first.stdout, "globex")[4:] == ["2.00", "1.00", "0.00", "0.00", "90.00", "19.00"]
    # Mid-month signup: 5 hosts from the 15th → 5 × 17 × 24 / 744 = 2.74 on average.
    assert _row(first.stdout, "stark")[3:5] == ["408", "2.74"]
    assert _row(first.stdout, "cyberdyne")[2:4] == ["free", "0"]
    assert "coverage 744/744 hours" in first.stdout
    # Then the current month: an estimate table, one budget alert, its event delivered.
    assert "usage estimate " in first.stdout and _row(first.stdout, "acme")
    assert re.search(r"delivered usage\.threshold evt_[0-9a-f]{32} to http://127\.0\.0\.1:\d+/"
                     r"hooks: HTTP 200, signature verified", first.stdout), first.stdout

    engine = db.create_engine(db_url)
    us = m.usage_snapshots  # October's (the current month's part depends on the clock)
    october = sa.select(sa.func.count(), sa.func.sum(us.c.standard_hosts),
                        sa.func.sum(us.c.monitors)).where(
        us.c.hour < datetime(2026, 10, 31, 15, tzinfo=UTC))
    with engine.connect() as conn:
        before = conn.execute(october).one()
    again = _hostmeter("demo", "--tenants", "12", "--period", "2026-10", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert "(0 rows written)" in again.stdout
    assert "delivered usage.threshold" not in again.stdout
    assert "no new event: this alert already crossed this month" in again.stdout
    with engine.connect() as conn:
        after = conn.execute(october).one()
    engine.dispose()
    assert tuple(after) == tuple(before)
    assert (tmp_path / "logs" / "hostmeter.jsonl").is_file()


def test_demo_in_an_empty_directory_creates_hostmeter_db(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTMETER_")}
    result = _hostmeter("demo", "--tenants", "12", "--period", "2026-02", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hostmeter.db").is_file()
    assert "coverage 672/672 hours" in result.stdout


def test_demo_rejects_a_bad_period(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTMETER_")}
    result = _hostmeter("demo", "--period", "2026-13", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "hostmeter: error: period '2026-13' is not a month in the form YYYY-MM (e.g. 2026-10)"]
    assert not (tmp_path / "hostmeter.db").exists()


def test_demo_notices_estimate_alert_and_deliver_once(engine: Engine) -> None:
    """The current-month part at a fixed instant: estimates for the paying tenants, one
    usage.threshold delivered with a valid signature, the demo's endpoint removed after; run
    again, nothing new is sent."""
    from billing import notices as n
    from jobs.runtime.context import JobContext
    from jobs.synthetic.demo import run_demo_notices
    from metering.settings import Settings

    ctx = JobContext(engine=engine, settings=Settings(), trigger="manual")
    now = datetime(2026, 10, 10, 5, 30, tzinfo=UTC)  # 14:30 on the 10th in Tokyo
    first = run_demo_notices(ctx, now, tenants=12)
    assert first.period == "2026-10" and first.hours_missing == 0
    assert {e.tenant for e in first.estimates} >= {"acme", "globex"}
    acme = next(e for e in first.estimates if e.tenant == "acme")
    assert acme.projected.total > acme.mtd.total > 0
    assert first.alert is not None and first.alert.alert.threshold < acme.projected.total
    [got] = first.received
    assert (got.event_type, got.signature_valid, got.answered) == ("usage.threshold", True, 200)
    assert got.payload is not None and got.payload["tenant"] == "acme"
    with engine.connect() as conn:
        enabled = conn.execute(sa.select(sa.func.count()).select_from(n.webhook_endpoints)
                               .where(n.webhook_endpoints.c.enabled.is_(True))).scalar()
    assert enabled == 0

    again = run_demo_notices(ctx, now, tenants=12)
    assert again.received == [] and again.estimate.counts["alerts_crossed"] == 0
