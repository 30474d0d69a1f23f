"""PostgreSQL goes away while a command runs: one line on stderr, exit 1, nothing leaked.

A private cluster (see ``pgcluster.py``) is stopped (``pg_ctl stop -m immediate``, what a crash
or a failover looks like to a client) while ``hostmeter`` works: during ``ingest``, during a
``backfill`` (the runner, with its ledger and lock) and during ``billing close`` (a job run by
the command itself). Each time the operator must get exactly one ``hostmeter: error:`` line
that says what happened and what to do, exit code 1, and neither the SQL text, its bound
parameters nor the password in it, on stderr or in the log files; every ``job_finished`` line's
``error`` is one line without them either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from pgcluster import PrivateCluster, private_cluster

from metering.settings import Settings
from metering.timeutil import hours_between, month_bounds

pytestmark = pytest.mark.slow

PERIOD = "2026-10"
AFTER = "2026-11-01T03:00:00+09:00"
PASSWORD = "fault-P@ss-" + uuid.uuid4().hex[:8]  # percent-encoded in the URL (%40)
TENANTS = [f"tenant-confidential-{i}" for i in range(4)]


def _usage(path: Path) -> None:
    start, end = month_bounds(PERIOD, Settings().zone)
    with path.open("w") as f:
        for tenant in TENANTS:
            f.write(json.dumps({"type": "plan", "tenant": tenant, "plan": "standard",
                                "at": start.isoformat()}) + "\n")
            for h in hours_between(start, end):
                for i in range(3):
                    f.write(json.dumps({
                        "type": "host_post", "tenant": tenant, "host": f"{tenant}-h{i}",
                        "kind": "standard", "at": (h + timedelta(minutes=3)).isoformat(),
                        "metrics": [f"m{k}" for k in range(8)]}) + "\n")


class Setup:
    def __init__(self, cluster: PrivateCluster, role: str, usage: Path) -> None:
        self.cluster, self.role, self.usage = cluster, role, usage

    def database(self, *, template: str | None = None) -> str:
        """A fresh database owned by the role (a copy of ``template``); returns its URL."""
        name = f"hm_{uuid.uuid4().hex[:10]}"
        copy = f" TEMPLATE {template}" if template else ""
        self.cluster.psql(f"CREATE DATABASE {name} OWNER {self.role}{copy}")
        return self.cluster.url(self.role, PASSWORD, name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    usage = tmp_path_factory.mktemp("usage") / "october.jsonl"
    _usage(usage)
    with private_cluster() as cluster:
        role = f"hm_fault_{uuid.uuid4().hex[:8]}"
        cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
        setup = Setup(cluster, role, usage)
        # a month of recorded usage, ingested once; each test copies it
        url = setup.database()
        proc = _hostmeter(tmp_path_factory.mktemp("seed"), url, "ingest", str(usage))
        assert proc.wait(timeout=300) == 0
        setup.seeded = sa.engine.make_url(url).database  # type: ignore[attr-defined]
        yield setup


def _hostmeter(cwd: Path, url: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "HOSTMETER_DATABASE_URL": url, "HOSTMETER_LOG_DIR": str(cwd / "logs")}
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(what: str, check: object, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _logged(cwd: Path, event: str) -> bool:
    return any(f'"event": "{event}"' in p.read_text() for p in (cwd / "logs").glob("*.jsonl"))


def _writing(setup: Setup, url: str) -> bool:
    """Whether a session on ``url``'s database is in a transaction that has written."""
    engine = sa.create_engine(setup.cluster.admin_url())
    try:
        with engine.connect() as conn:
            return bool(conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %(db)s "
                "AND backend_xid IS NOT NULL", {"db": sa.engine.make_url(url).database},
            ).scalar_one())
    finally:
        engine.dispose()


@pytest.mark.parametrize("command", ["ingest", "backfill", "billing close"])
def test_postgresql_lost_mid_run_is_one_line_and_exit_1(setup: Setup, tmp_path: Path,
                                                        command: str) -> None:
    if command == "ingest":
        url = setup.database()
        args = ["ingest", str(setup.usage)]
    else:
        url = setup.database(template=setup.seeded)  # type: ignore[attr-defined]
        args = (["backfill", "snapshot-usage", "--from", "2026-09-30T15:00:00Z",
                 "--to", "2026-10-31T15:00:00Z"] if command == "backfill"
                else ["billing", "close", "--period", PERIOD, "--at", AFTER])
    proc = _hostmeter(tmp_path, url, *args)
    try:
        if command != "ingest":
            _wait_for("job_started", lambda: _logged(tmp_path, "job_started"))
        _wait_for("a write transaction", lambda: _writing(setup, url))
        assert proc.poll() is None, "the command ended before the database went away"
        setup.cluster.stop()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        setup.cluster.start()

    assert proc.returncode == 1, stderr
    errors = [ln for ln in stderr.splitlines() if not ln.startswith("{")]
    assert len(errors) == 1, stderr
    [line] = errors
    assert line.startswith(("hostmeter: error: lost the connection to the database "
                            "postgresql+psycopg://",
                            "hostmeter: error: the database postgresql+psycopg://")), line
    assert ":***@127.0.0.1:" in line and "run the command again" in line
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*"))
    for text in (stdout, stderr, logs):
        assert PASSWORD not in text and PASSWORD.replace("@", "%40") not in text
    for leak in ("Traceback", "[SQL", "[parameters", "INSERT INTO", "confidential"):
        assert leak not in line
    for raw in logs.splitlines():
        event = json.loads(raw)
        if event["event"] == "job_finished" and event.get("error"):
            assert "\n" not in event["error"] and len(event["error"]) <= 300
            assert "[SQL" not in event["error"] and "[parameters" not in event["error"]
            assert "confidential" not in event["error"]
