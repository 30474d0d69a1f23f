"""``hostmeter demo`` end to end, as a new user runs it, on every backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from metering import db


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

    engine = db.create_engine(db_url)
    with engine.connect() as conn:
        before = conn.execute(sa.text(
            "SELECT count(*), sum(standard_hosts), sum(monitors) FROM usage_snapshots")).one()
    again = _hostmeter("demo", "--tenants", "12", "--period", "2026-10", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert "(0 rows written)" in again.stdout
    with engine.connect() as conn:
        after = conn.execute(sa.text(
            "SELECT count(*), sum(standard_hosts), sum(monitors) FROM usage_snapshots")).one()
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
