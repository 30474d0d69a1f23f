"""``hostmeter usage estimate``: the table, JSON, a tenant filter, errors, and that it writes
nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billing import estimate
from jobs import snapshot_usage
from jobs.runtime.context import JobContext, run_job
from metering.db import metadata
from metering.ingest import UsageRecorder
from metering.records import HostPost, PlanChange, Record
from metering.settings import Settings
from metering.timeutil import HOUR, hours_between, month_bounds

PERIOD = "2026-10"
ZONE = Settings().zone  # Asia/Tokyo
START, END = month_bounds(PERIOD, ZONE)


def local(day: int, hour: int = 0, minute: int = 0) -> datetime:
    return (datetime(2026, 10, day, tzinfo=ZONE).astimezone(UTC) + hour * HOUR
            + timedelta(minutes=minute))


AS_OF = local(3, 7)
AT = local(3, 7, 20).isoformat()  # any instant in the hour: as of its start


@pytest.fixture
def hostmeter(db_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    env = {**os.environ, "HOSTMETER_DATABASE_URL": db_url,
           "HOSTMETER_LOG_DIR": str(tmp_path / "logs")}

    def call(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", "usage", "estimate", *args],
                              env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        return proc

    return call


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("hostmeter: error:")]


@pytest.fixture
def seeded(engine: Engine) -> Engine:
    """acme: 2 standard hosts and 1 micro host every hour; globex: 3 standard hosts from day 2;
    tyrell: free. Everything up to AS_OF snapshotted except one hour."""
    def posts() -> Iterator[Record]:
        yield PlanChange(tenant="acme", plan="standard", at=START)
        yield PlanChange(tenant="globex", plan="standard", at=START)
        yield PlanChange(tenant="tyrell", plan="free", at=START)
        for h in hours_between(START, AS_OF):
            at = h + timedelta(minutes=3)
            for host in ("a", "b"):
                yield HostPost(tenant="acme", host=host, kind="standard", at=at,
                               metrics=("loadavg5",))
            yield HostPost(tenant="acme", host="m", kind="micro", at=at, metrics=("x",))
            yield HostPost(tenant="tyrell", host="f", kind="standard", at=at, metrics=("x",))
            if h >= local(2):
                for host in ("a", "b", "c"):
                    yield HostPost(tenant="globex", host=host, kind="standard", at=at,
                                   metrics=("loadavg5",))
    UsageRecorder(engine).record(posts())
    ctx = JobContext(engine=engine, settings=Settings())
    hours = [h for h in hours_between(START, AS_OF) if h != local(1, 5)]
    assert run_job("snapshot-usage", snapshot_usage.run, ctx, START, hours=hours).ok
    return engine


def row_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                for t in metadata.sorted_tables}


def table_row(stdout: str, tenant: str) -> list[str]:
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0] == tenant:
            return cells
    raise AssertionError(f"no row for {tenant} in:\n{stdout}")


def test_table_shows_month_to_date_and_projection(seeded: Engine, hostmeter: Any) -> None:
    before = row_counts(seeded)
    out = hostmeter("--at", AT).stdout
    # acme: 2 standard hosts in the 54 snapshotted hours of 744: 108/744 = 9/62; projected
    # 108 + 28·48 + 17·2 = 1486 host-hours (743/372 on average) → 2 units
    assert table_row(out, "acme") == [
        "acme", "9/62 (0.15)", "9/124 (0.07)", "1/1", "2493", "2/1", "4326", "JPY"]
    # globex: 3 hosts for the 31 hours since day 2; projected (93 + 28·72 + 17·3)/744 → 3
    assert table_row(out, "globex") == [
        "globex", "1/8 (0.13)", "0", "1/0", "1833", "3/0", "5499", "JPY"]
    assert "tyrell" not in out
    assert f"as of {AS_OF.isoformat()} (2026-10-03 07:00 Asia/Tokyo); 55 of 744 hours" in out
    assert ("projection method last_day: the last complete day (2026-10-02 00:00 to "
            "2026-10-03 00:00 Asia/Tokyo) carried forward 28 time(s), then its last 17 hour(s)"
            in out)
    assert "coverage: 1 hour(s) before" in out and "not snapshotted" in out
    assert "estimate-usage stores the same figures" in out
    assert row_counts(seeded) == before  # read only: not a row anywhere, not a ledger row


def test_json_has_stable_keys_and_money_as_decimal_strings(seeded: Engine,
                                                           hostmeter: Any) -> None:
    before = row_counts(seeded)
    doc = json.loads(hostmeter("--at", AT, "--format", "json").stdout)
    assert {k: doc[k] for k in ("period", "as_of", "hours_in_month", "hours_elapsed",
                                "hours_missing", "method")} == {
        "period": PERIOD, "as_of": AS_OF.isoformat(), "hours_in_month": 744,
        "hours_elapsed": 55, "hours_missing": 1, "method": "last_day"}
    assert doc["profile"] == {"start": local(2).isoformat(), "end": local(3).isoformat(),
                              "times": 28, "leftover_hours": 17}
    [acme, globex] = doc["tenants"]
    assert acme == {
        "tenant": "acme", "paid_hours": 54, "catalog": "2019-10", "currency": "JPY",
        "mtd": {"standard_hosts_average": "9/62", "micro_hosts_average": "9/124",
                "standard_units": 1, "micro_units": 1, "subtotal": "2267", "tax": "226",
                "total": "2493"},
        "projected": {"standard_hosts_average": "743/372",
                      "micro_hosts_average": "743/744", "paid_hours": 743,
                      "standard_units": 2, "micro_units": 1, "subtotal": "3933",
                      "tax": "393", "total": "4326"},
    }
    assert globex["tenant"] == "globex" and globex["projected"]["total"] == "5499"
    # the same function the job stores
    with seeded.connect() as conn:
        live = estimate.compute(conn, period=PERIOD, as_of=AS_OF, zone=ZONE)
    assert [(e.tenant, str(e.projected.total)) for e in live] == [
        (t["tenant"], t["projected"]["total"]) for t in doc["tenants"]]
    assert row_counts(seeded) == before


def test_tenant_filter(seeded: Engine, hostmeter: Any) -> None:
    doc = json.loads(hostmeter("--at", AT, "--tenant", "globex", "--format", "json").stdout)
    assert [t["tenant"] for t in doc["tenants"]] == ["globex"]
    # a tenant with no paid hour yet: known, nothing to estimate
    out = hostmeter("--at", AT, "--tenant", "tyrell").stdout
    assert "no tenant has a paid hour in 2026-10" in out


def test_unknown_tenant_is_bad_input(seeded: Engine, hostmeter: Any) -> None:
    proc = hostmeter("--at", AT, "--tenant", "acme", "--tenant", "nobody", code=2)
    assert errors(proc.stderr) == [
        "hostmeter: error: unknown tenant(s): 'nobody' (tenant keys are exact and "
        "case-sensitive)"]
    assert proc.stdout == ""


@pytest.mark.parametrize(("at", "says"), [
    pytest.param("yesterday", "is not an ISO 8601 instant", id="not_a_date"),
    pytest.param("2026-10-03T07:00:00", "has no UTC offset", id="no_offset"),
])
def test_bad_at_is_bad_input(engine: Engine, hostmeter: Any, at: str, says: str) -> None:
    proc = hostmeter("--at", at, code=2)
    [line] = errors(proc.stderr)
    assert line.startswith("hostmeter: error: --at ") and says in line


def test_empty_database_says_so(engine: Engine, hostmeter: Any) -> None:
    before = row_counts(engine)
    out = hostmeter("--at", AT).stdout
    assert "no tenant has a paid hour in 2026-10 before 2026-10-02T22:00:00+00:00" in out
    assert "coverage: 55 hour(s) before" in out
    doc = json.loads(hostmeter("--at", AT, "--format", "json").stdout)
    assert (doc["tenants"], doc["hours_missing"]) == ([], 55)
    assert row_counts(engine) == before
