"""End to end through the CLI, as an operator runs it: ingest a whole month of JSON Lines,
close it, read ``billing show --format json``, then late usage, rerun, finalize, adjust."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from jobs.synthetic.fleet import metric_names
from metering.settings import Settings
from metering.timeutil import HOUR, hours_between, month_bounds

PERIOD = "2026-10"
AFTER = "2026-11-01T03:00:00+09:00"  # the scheduled close time


def _month_of_pattern_b(path: Path) -> None:
    """BILLING_RULES.md §5 pattern B for every hour of October 2026 (Asia/Tokyo)."""
    start, end = month_bounds(PERIOD, Settings().zone)
    a, b, c = metric_names(401), metric_names(180), metric_names(50)
    svc = metric_names(240, "svc")
    with path.open("w") as f:
        def put(rec: dict[str, Any]) -> None:
            f.write(json.dumps(rec) + "\n")

        put({"type": "plan", "tenant": "acme", "plan": "standard",
             "at": "2026-10-01T00:00:00+09:00"})
        for i in range(30):
            put({"type": "monitor", "tenant": "acme", "monitor": f"m-{i}",
                 "at": start.isoformat(), "state": "created"})
        for h in hours_between(start, end):
            at = (h + timedelta(minutes=3)).isoformat()
            # host A posts its 401 names in two overlapping posts: distinct names count once
            put({"type": "host_post", "tenant": "acme", "host": "a", "kind": "standard",
                 "at": h.isoformat(), "metrics": list(a[:250])})
            put({"type": "host_post", "tenant": "acme", "host": "a", "kind": "standard",
                 "at": (h + HOUR - timedelta(milliseconds=1)).isoformat(),
                 "metrics": list(a[200:])})
            put({"type": "host_post", "tenant": "acme", "host": "b", "kind": "standard",
                 "at": at, "metrics": list(b)})
            put({"type": "host_post", "tenant": "acme", "host": "c", "kind": "micro",
                 "at": at, "metrics": list(c)})
            put({"type": "service_post", "tenant": "acme", "service": "web", "at": at,
                 "metrics": list(svc[:120])})
            put({"type": "service_post", "tenant": "acme", "service": "batch", "at": at,
                 "metrics": list(svc[120:])})


def _late_host_hours(path: Path, host: str, hours: int) -> None:
    start, _ = month_bounds(PERIOD, Settings().zone)
    with path.open("w") as f:
        for i in range(hours):
            at: datetime = start + i * HOUR
            f.write(json.dumps({"type": "host_post", "tenant": "acme", "host": host,
                                "kind": "standard", "at": at.isoformat(),
                                "metrics": ["loadavg5"]}) + "\n")


@pytest.fixture
def hostmeter(db_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    env = {**os.environ, "HOSTMETER_DATABASE_URL": db_url,
           "HOSTMETER_LOG_DIR": str(tmp_path / "logs")}

    def run(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        return proc

    return run


def _errors(stderr: str) -> list[str]:
    """The one-line errors (stderr also carries the JSON log lines when not a terminal)."""
    return [ln for ln in stderr.splitlines() if ln.startswith("hostmeter: error:")]


def _show(hostmeter: Any) -> dict[str, Any]:
    return json.loads(hostmeter("billing", "show", "--period", PERIOD, "--format", "json").stdout)


def test_month_close_rerun_finalize_adjust(hostmeter: Any, tmp_path: Path) -> None:
    usage = tmp_path / "october.jsonl"
    _month_of_pattern_b(usage)
    hostmeter("ingest", str(usage))
    closed = json.loads(hostmeter("billing", "close", "--period", PERIOD, "--at", AFTER,
                                  "--format", "json").stdout)
    assert closed["rebuilt_hours"] == 744 and closed["invoices_written"] == 1

    doc = _show(hostmeter)
    assert doc["period"] == PERIOD
    [inv] = doc["invoices"]
    assert {k: inv[k] for k in ("tenant", "revision", "status", "currency", "standard_units",
                                "micro_units", "total", "tax", "adjustments")} == {
        "tenant": "acme", "revision": 1, "status": "draft", "currency": "JPY",
        "standard_units": 6, "micro_units": 2, "total": "12318", "tax": "1119",
        "adjustments": []}
    lines = {ln["item"]: ln for ln in inv["lines"]}
    assert lines["standard_hosts"] == {
        "item": "standard_hosts", "unit": "standard", "units": 2, "unit_price": "1833",
        "amount": "3666",
        "basis": {"hour_sum": 1488, "hours_in_month": 744, "average": "2", "paid_hours": 744,
                  "limit": None, "catalog": "2019-10"}}
    assert {k: (v["units"], v["basis"]["average"], v["basis"]["limit"])
            for k, v in lines.items()} == {
        "standard_hosts": (2, "2", None),
        "standard_host_metric_overage": (2, "201", 200),
        "micro_hosts": (1, "1", None),
        "micro_host_metric_overage": (1, "20", 30),
        "service_metric_overage": (1, "240", 200),
        "external_monitor_overage": (1, "30", 20),
    }

    # Close twice, rerun with unchanged data: still revision 1, nothing written.
    again = json.loads(hostmeter("billing", "close", "--period", PERIOD, "--at", AFTER,
                                 "--format", "json").stdout)
    assert (again["invoices_written"], again["unchanged"], again["rebuilt_hours"]) == (0, 1, 0)
    same = json.loads(hostmeter("billing", "rerun", "--period", PERIOD, "--at", AFTER,
                                "--format", "json").stdout)
    assert (same["invoices_written"], same["unchanged"]) == (0, 1)
    assert _show(hostmeter) == doc

    # Late usage after close: a third standard host for 10 hours → ⌈1498/744⌉ = 3 hosts.
    late = tmp_path / "late.jsonl"
    _late_host_hours(late, "d", 10)
    hostmeter("ingest", str(late))
    closed_stale = json.loads(hostmeter("billing", "close", "--period", PERIOD, "--at", AFTER,
                                        "--format", "json").stdout)
    assert closed_stale["invoices_written"] == 0  # close never revises; it reports
    preview = json.loads(hostmeter("billing", "rerun", "--period", PERIOD, "--at", AFTER,
                                   "--dry-run", "--format", "json").stdout)
    [t] = preview["tenants"]
    assert (t["action"], t["old"]["total"], t["new"]["total"], t["difference"]) == (
        "revised", 12318, 14151, 1833)
    assert _show(hostmeter) == doc  # the dry run wrote nothing

    hostmeter("billing", "rerun", "--period", PERIOD, "--at", AFTER, "--reason", "late posts")
    revs = _show(hostmeter)["invoices"]
    assert [(r["revision"], r["status"], r["total"]) for r in revs] == [
        (1, "void", "12318"), (2, "draft", "14151")]

    # Finalize, then more late usage: the final revision stays, a new draft adjusts it.
    hostmeter("billing", "finalize", "--period", PERIOD)
    final = _show(hostmeter)["invoices"][1]
    assert final["status"] == "final"
    late2 = tmp_path / "late2.jsonl"
    _late_host_hours(late2, "e", 400)  # 1498 + 400 → ⌈1898/744⌉ = 3: still 3 hosts
    _late_host_hours(tmp_path / "x.jsonl", "f", 400)  # + 400 → ⌈2298/744⌉ = 4 hosts
    hostmeter("ingest", str(late2))
    hostmeter("ingest", str(tmp_path / "x.jsonl"))
    refused = hostmeter("billing", "rerun", "--period", PERIOD, "--at", AFTER, code=2)
    [error] = _errors(refused.stderr)
    assert "--reason" in error
    assert _show(hostmeter)["invoices"][1] == final

    hostmeter("billing", "rerun", "--period", PERIOD, "--at", AFTER, "--reason",
              "two hosts were missing")
    revs = _show(hostmeter)["invoices"]
    assert [(r["revision"], r["status"]) for r in revs] == [
        (1, "void"), (2, "final"), (3, "draft")]
    assert revs[1] == final  # the final invoice is untouched
    [adj] = revs[2]["adjustments"]
    assert adj["adjusts_revision"] == 2
    assert adj["amount"] == "1833" and adj["standard_units"] == 1
    assert int(revs[2]["total"]) - int(final["total"]) == int(adj["amount"])
    assert adj["reason"] == "two hosts were missing"
    assert revs[2]["reason"] == "two hosts were missing" and "@" in revs[2]["created_by"]

    csv_out = hostmeter("billing", "show", "--period", PERIOD, "--format", "csv").stdout
    assert csv_out.splitlines()[0].startswith("period,tenant,revision,status")
    assert len(csv_out.strip().splitlines()) == 4


def test_bad_input_is_one_line_and_exit_2(hostmeter: Any) -> None:
    for args in (["billing", "close", "--period", "2026-13"],
                 ["billing", "show", "--period", "2026-10", "--tenant", "nobody"],
                 ["billing", "rerun", "--period", "oct"]):
        proc = hostmeter(*args, code=2)
        assert len(_errors(proc.stderr)) == 1, proc.stderr
        assert "Traceback" not in proc.stderr


def test_closing_a_month_that_is_not_over_lists_the_hours(hostmeter: Any) -> None:
    proc = hostmeter("billing", "close", "--period", PERIOD, "--at",
                     "2026-10-31T12:00:00+09:00", code=1)
    [error] = _errors(proc.stderr)
    assert "cannot be rebuilt" in error and "not over yet" in error
    assert "2026-10-31T03:00:00+00:00…2026-10-31T14:00:00+00:00" in error
