"""``hostmeter scheduler`` as a real process: catch-up on start, clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from jobs.registry import JOBS
from jobs.triggers.runner import list_runs


@pytest.mark.slow
def test_scheduler_catches_up_then_stops_on_sigterm(db_url: str, engine: Engine,
                                                    tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    env = {**os.environ, "HOSTMETER_DATABASE_URL": db_url, "HOSTMETER_LOG_DIR": str(logs)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "scheduler"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log_file = logs / "hostmeter.jsonl"
    deadline = time.monotonic() + 60
    started = False
    while time.monotonic() < deadline and not started:
        time.sleep(0.2)
        started = log_file.exists() and '"scheduler_started"' in log_file.read_text()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert started, err
    assert proc.returncode == 0, err

    events = [json.loads(line)["event"] for line in log_file.read_text().splitlines()]
    assert events.index("scheduler_started") < events.index("scheduler_stopped")
    runs = list_runs(engine)
    # A fresh database: every job catches up its single most recent fire time, once.
    assert sorted(r["job"] for r in runs) == sorted(JOBS)
    assert {r["trigger"] for r in runs} == {"catch-up"}
    assert {r["status"] for r in runs} == {"succeeded"}
