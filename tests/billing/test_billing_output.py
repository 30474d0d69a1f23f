"""What ``hostmeter billing`` shows when tenants chose hostile names: terminal tables that
cannot be driven by escape sequences, a CSV export that cannot carry a formula, errors that
quote and cut the names they echo."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PERIOD = "2026-10"
AFTER = "2026-11-01T03:00:00+09:00"
ESCAPES = "\x1b]0;owned\x07\x1b[31macme"
FORMULA = '=HYPERLINK("http://evil.example/","click")'
NAMES = [ESCAPES, FORMULA, "-2+3", "@SUM(A1)", "日本テナント"]


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


@pytest.fixture
def hostile_month(hostmeter: Any, tmp_path: Path) -> None:
    usage = tmp_path / "usage.jsonl"
    with usage.open("w") as f:
        for name in NAMES:
            f.write(json.dumps({"type": "plan", "tenant": name, "plan": "standard",
                                "at": "2026-10-01T00:00:00+09:00"}) + "\n")
            f.write(json.dumps({"type": "host_post", "tenant": name, "host": f"{name}-host",
                                "kind": "standard", "at": "2026-10-05T10:03:00Z",
                                "metrics": ["loadavg5"]}) + "\n")
    hostmeter("ingest", str(usage))


def test_tables_show_names_without_obeying_them(hostmeter: Any, hostile_month: None) -> None:
    closed = hostmeter("billing", "close", "--period", PERIOD, "--at", AFTER).stdout
    shown = hostmeter("billing", "show", "--period", PERIOD).stdout
    for out in (closed, shown):
        assert "\x1b" not in out and "\x07" not in out
        assert "\\x1b]0;owned\\x07\\x1b[31macme" in out
        assert FORMULA in out and "日本テナント" in out


def test_csv_cells_cannot_be_formulas(hostmeter: Any, hostile_month: None) -> None:
    hostmeter("billing", "close", "--period", PERIOD, "--at", AFTER)
    text = hostmeter("billing", "show", "--period", PERIOD, "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(text)))
    tenants = {r["tenant"] for r in rows}
    assert tenants == {ESCAPES, "'" + FORMULA, "'-2+3", "'@SUM(A1)", "日本テナント"}
    for row in rows:
        assert int(row["total"]) > 0 and int(row["revision"]) == 1  # numbers stay numbers
        assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row.values())


def test_unknown_tenants_are_quoted_and_long_ones_cut(hostmeter: Any,
                                                      hostile_month: None) -> None:
    proc = hostmeter("billing", "show", "--period", PERIOD, "--tenant", "日本テナント",
                     "--tenant", "Acme ", code=2)
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("hostmeter: error:")]
    assert line.startswith("hostmeter: error: unknown tenant(s): 'Acme '")
    proc = hostmeter("billing", "rerun", "--period", PERIOD, "--at", AFTER, "--dry-run",
                     "--tenant", "x" * 10240, code=2)
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("hostmeter: error:")]
    assert "…(10240 chars)" in line and len(line) < 300
