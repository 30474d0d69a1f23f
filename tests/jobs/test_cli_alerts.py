"""``hostmeter alerts set|list|remove`` on SQLite and PostgreSQL: what they print, what they
write, and their one-line errors (exit 2, nothing written)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy.engine import Engine

from billing import notices as n
from jobs.cli import cli as hostmeter_cli
from metering import models as m

PERIOD = "2026-10"
AS_OF = datetime(2026, 10, 20, 6, tzinfo=UTC)
AT = (AS_OF + timedelta(minutes=40)).isoformat()  # a set in the same month, after the estimate


def invoke(db_url: str, *args: str) -> Result:
    return CliRunner().invoke(hostmeter_cli, ["--database-url", db_url, *args],
                              env={"HOSTMETER_BILLING_TZ": "Asia/Tokyo"})


def the_error(result: Result) -> str:
    """The one error line (other stderr lines are JSON log lines)."""
    lines = [ln for ln in result.stderr.splitlines() if not ln.startswith("{")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hostmeter: error: "), result.stderr
    return lines[0]


@pytest.fixture
def fleet(engine: Engine) -> dict[str, int]:
    """Tenants acme (projected 54990 JPY, 30 standard units) and globex (no estimate)."""
    with engine.begin() as conn:
        ids = {k: conn.execute(sa.insert(m.tenants).values(key=k).returning(m.tenants.c.id))
               .scalar_one() for k in ("acme", "globex")}
        conn.execute(sa.insert(n.usage_estimates).values(
            period=PERIOD, tenant_id=ids["acme"], as_of=AS_OF, hours_in_month=744,
            hours_elapsed=462, paid_hours=462, catalog_version="2019-10", currency="JPY",
            minor_units=0, mtd_standard_units=19, mtd_micro_units=0, mtd_total=34827,
            projected_standard_units=30, projected_micro_units=0, projected_total=54990,
            method="last_day", computed_at=AS_OF, run_id="run-1"))
    return ids


def outbox(engine: Engine) -> list[tuple[str, str, dict[str, Any]]]:
    ev = n.outbox_events
    with engine.connect() as conn:
        return [(r.type, r.payload["tenant"], r.payload["data"])
                for r in conn.execute(sa.select(ev).order_by(ev.c.id))]


def stored(engine: Engine) -> list[tuple[Any, ...]]:
    a = n.budget_alerts
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            sa.select(a.c.tenant_id, a.c.measure, a.c.updated_by).order_by(a.c.id))]


def test_set_crossed_now_queues_the_event(engine: Engine, db_url: str,
                                          fleet: dict[str, int]) -> None:
    result = invoke(db_url, "alerts", "set", "--tenant", "acme", "--amount", "50000",
                    "--standard-units", "40", "--at", AT)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"budget alerts of 'acme' ({PERIOD})" in out
    assert "50000 JPY" in out and "54990" in out and "crossed (#1)" in out
    assert "under" in out  # 30 standard units < 40
    assert "usage.threshold queued for 'acme' (amount)" in out
    [(kind, tenant, data)] = outbox(engine)
    assert (kind, tenant, data["threshold"], data["value"]) == (
        "usage.threshold", "acme", "50000", "54990")
    assert [r[1] for r in stored(engine)] == ["amount", "standard_units"]
    assert "@" in stored(engine)[0][2]  # the actor: user@host

    # again, the same thresholds: nothing new
    again = invoke(db_url, "alerts", "set", "--tenant", "acme", "--amount", "50000", "--at", AT)
    assert again.exit_code == 0 and "unchanged" in again.stdout
    assert len(outbox(engine)) == 1
    # raised above the projection: cleared at once
    raised = invoke(db_url, "alerts", "set", "--tenant", "acme", "--amount", "60000",
                    "--at", AT)
    assert raised.exit_code == 0, raised.output
    assert "usage.threshold_cleared queued" in raised.stdout
    assert [k for k, _, _ in outbox(engine)] == ["usage.threshold", "usage.threshold_cleared"]


def test_set_without_an_estimate(engine: Engine, db_url: str, fleet: dict[str, int]) -> None:
    result = invoke(db_url, "alerts", "set", "--tenant", "globex", "--micro-units", "3",
                    "--at", AT)
    assert result.exit_code == 0, result.output
    assert "no estimate yet" in result.stdout
    assert outbox(engine) == []


@pytest.mark.parametrize(("args", "says"), [
    ([], "give at least one threshold"),
    (["--amount", "-100"], "--amount must not be negative"),
    (["--amount", "0"], "--amount must be greater than zero"),
    (["--amount", "lots"], "--amount 'lots' is not a number"),
    (["--amount", "50000.5"], "--amount 50000.5: JPY has no decimals"),
    (["--standard-units", "2.5"], "--standard-units 2.5: units are whole numbers"),
    (["--micro-units", "x"], "--micro-units 'x' is not a number"),
    # a good threshold next to a bad one: nothing is written
    (["--amount", "100", "--micro-units", "-1"], "--micro-units must not be negative"),
])
def test_set_refuses_bad_thresholds(engine: Engine, db_url: str, fleet: dict[str, int],
                                    args: list[str], says: str) -> None:
    result = invoke(db_url, "alerts", "set", "--tenant", "acme", *args, "--at", AT)
    assert result.exit_code == 2, result.output
    assert says in the_error(result)
    assert stored(engine) == [] and outbox(engine) == []


def test_set_refuses_an_unknown_tenant(engine: Engine, db_url: str,
                                       fleet: dict[str, int]) -> None:
    result = invoke(db_url, "alerts", "set", "--tenant", "nobody", "--amount", "100",
                    "--at", AT)
    assert result.exit_code == 2
    assert "unknown tenant(s): 'nobody'" in the_error(result)
    # two measures for an unknown tenant: neither written
    assert stored(engine) == []


def test_list_table_and_json(engine: Engine, db_url: str, fleet: dict[str, int]) -> None:
    assert invoke(db_url, "alerts", "list").stdout.strip() == "no budget alerts"
    invoke(db_url, "alerts", "set", "--tenant", "acme", "--amount", "50000", "--at", AT)
    invoke(db_url, "alerts", "set", "--tenant", "globex", "--standard-units", "5", "--at", AT)
    table = invoke(db_url, "alerts", "list")
    assert table.exit_code == 0, table.output
    assert "acme" in table.stdout and "globex" in table.stdout
    assert "crossed (#1)" in table.stdout and "no estimate yet" in table.stdout
    doc = json.loads(invoke(db_url, "alerts", "list", "--tenant", "acme", "--format",
                            "json").stdout)
    [alert] = doc["alerts"]
    assert {k: alert[k] for k in ("tenant", "measure", "threshold", "period", "crossed",
                                  "crossings", "value", "as_of")} == {
        "tenant": "acme", "measure": "amount", "threshold": "50000", "period": PERIOD,
        "crossed": True, "crossings": 1, "value": "54990", "as_of": AS_OF.isoformat()}
    unknown = invoke(db_url, "alerts", "list", "--tenant", "nobody")
    assert unknown.exit_code == 2 and "unknown tenant" in the_error(unknown)


def test_remove(engine: Engine, db_url: str, fleet: dict[str, int]) -> None:
    invoke(db_url, "alerts", "set", "--tenant", "acme", "--amount", "50000",
           "--micro-units", "2", "--at", AT)
    assert len(outbox(engine)) == 1
    one = invoke(db_url, "alerts", "remove", "--tenant", "acme", "--measure", "amount")
    assert one.exit_code == 0, one.output
    assert "removed amount alert(s) of 'acme' (no event sent)" in one.stdout
    assert [r[1] for r in stored(engine)] == ["micro_units"]
    missing = invoke(db_url, "alerts", "remove", "--tenant", "acme", "--measure", "amount")
    assert missing.exit_code == 0 and "nothing removed" in missing.stdout
    every = invoke(db_url, "alerts", "remove", "--tenant", "acme", "--all")
    assert every.exit_code == 0 and "micro_units" in every.stdout
    assert stored(engine) == []
    assert len(outbox(engine)) == 1  # removing sent nothing


@pytest.mark.parametrize(("args", "says"), [
    (["--tenant", "acme"], "give either --measure MEASURE or --all"),
    (["--tenant", "acme", "--measure", "amount", "--all"], "give either"),
    (["--tenant", "nobody", "--all"], "unknown tenant(s): 'nobody'"),
])
def test_remove_errors(engine: Engine, db_url: str, fleet: dict[str, int], args: list[str],
                       says: str) -> None:
    result = invoke(db_url, "alerts", "remove", *args)
    assert result.exit_code == 2
    assert says in the_error(result)
