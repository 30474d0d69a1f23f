"""PostgreSQL goes away in the middle of a close and of a backfill.

On a private cluster (never the shared server), with password authentication: the command is
started, the server is stopped (``immediate``: a crash, as a failover looks to a client) while
the command works, and then:

- the command exits 1 with exactly one error line on stderr (besides the JSON log lines), which
  names the database without its password and carries no SQL text; no bound parameter and no
  password appear anywhere in its output;
- after a restart, running the command again (a scheduled run: the retry pass) completes it,
  and the database then holds exactly what a database that never saw an outage holds.

Each command goes through :data:`OUTAGES` outages before it is let finish.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from dbstate import canonical, held_advisory_locks
from pgcluster import PrivateCluster, private_cluster
from workload import PERIOD, write_usage

from jobs.runtime.ledger import job_runs
from metering import db
from metering.settings import Settings
from metering.timeutil import month_bounds

OUTAGES = 3
PASSWORD = "s3cret@outage-pw"
START, END = month_bounds(PERIOD, Settings().zone)
CLOSE_AT = "2026-03-01T03:00:00+09:00"

COMMANDS = {
    "close": (["run", "close-billing-period", "--at", CLOSE_AT, "--trigger", "schedule"],
              ["run", "close-billing-period", "--retry-failed"]),
    "backfill": (["backfill", "snapshot-usage", "--from", START.isoformat(),
                  "--to", END.isoformat()], None),
}


def _hostmeter(url: str, work: Path, *args: str, timeout: float = 600
               ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOSTMETER_DATABASE_URL": url, "HOSTMETER_LOG_DIR": str(work / "logs")}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=work,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def cluster() -> PrivateCluster:
    with private_cluster() as c:
        yield c  # type: ignore[misc]


@pytest.fixture(scope="module")
def usage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("usage") / "usage.jsonl"
    write_usage(path, seed=21)
    return path


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_outage_mid_command_is_one_line_and_a_rerun_completes_it(
    cluster: PrivateCluster, usage: Path, tmp_path: Path, command: str
) -> None:
    run, finish = COMMANDS[command]
    urls = {}
    for name in ("ref", "outage"):
        urls[name] = cluster.add_role(f"hm_{command}_{name}", PASSWORD, f"hm_{command}_{name}")
        (tmp_path / name).mkdir()
        for step in (["db", "upgrade"], ["ingest", str(usage)]):
            done = _hostmeter(urls[name], tmp_path / name, *step)
            assert done.returncode == 0, done.stderr
    started = time.monotonic()
    done = _hostmeter(urls["ref"], tmp_path / "ref", *run)
    typical = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    ref = db.create_engine(urls["ref"])
    expected = canonical(ref)
    ref.dispose()

    errors = []
    env = {**os.environ, "HOSTMETER_DATABASE_URL": urls["outage"],
           "HOSTMETER_LOG_DIR": str(tmp_path / "outage" / "logs")}
    for i in range(OUTAGES):
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *run], env=env,
                                cwd=tmp_path / "outage", stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(typical * (0.45 + 0.15 * i))  # start-up done, work under way
        cluster.stop("immediate")
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            cluster.start()
        if proc.returncode == 0:  # it finished before the outage: not an outage mid-run
            continue
        lines = err.strip().splitlines()
        errors.append(lines[-1] if lines else "")
        assert proc.returncode == 1, err
        problem = [line for line in lines if not line.startswith("{")]  # JSON log lines aside
        assert len(problem) == 1 and problem[0].startswith("hostmeter: error: "), err
        assert "[SQL" not in problem[0] and "Traceback" not in problem[0], problem[0]
        # The JSON log lines keep the traceback for operators, but bound parameters (customer
        # data) and the password appear nowhere.
        for leak in ("[parameters:", PASSWORD, "s3cret", "%40outage"):
            assert leak not in err + out, (leak, err)
    assert errors, "no outage landed while the command ran"

    for step in ([finish] if finish else []) + [run]:
        done = _hostmeter(urls["outage"], tmp_path / "outage", *step)
        assert done.returncode == 0, done.stderr
    engine = db.create_engine(urls["outage"])
    try:
        assert canonical(engine) == expected
        with engine.connect() as conn:
            statuses = conn.execute(sa.select(job_runs.c.status)).scalars().all()
        assert "running" not in statuses
        assert held_advisory_locks(engine) == 0
    finally:
        engine.dispose()
    print(f"{command}: {len(errors)} outages mid-run; e.g. {errors[0]!r}")


def test_stopping_the_cluster_really_cuts_clients_off(cluster: PrivateCluster) -> None:
    """What the outages above rely on: a stopped cluster refuses a connected client."""
    url = cluster.add_role("hm_probe", PASSWORD, "hm_probe")
    engine = db.create_engine(url)
    try:
        db.check_connection(engine)
        cluster.stop("immediate")
        try:
            with pytest.raises(sa.exc.DBAPIError), engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        finally:
            cluster.start()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    finally:
        engine.dispose()
