"""SIGKILL at seeded random moments, for every command that writes.

For each command: a reference database gets the command run once, uninterrupted. A second
database, prepared the same way, gets the command started and SIGKILLed at a seeded random
moment of its run, again and again (at least :data:`KILLS` kills that land while the process is
alive), then finished the way an operator or the platform would (run it again; a scheduled run
by the retry pass). Then:

- the second database holds exactly what the reference holds (:func:`dbstate.canonical`: every
  data table's rows, natural keys for surrogate ids, no timestamps or run ids);
- no run is left ``running`` in the ledger, and no lock is held (PostgreSQL advisory locks;
  SQLite's lock files can be taken).

The kill moment is uniform over 20 %–95 % of the reference run's wall time, start-up included, so
kills land during imports, during the work and between transactions.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from dbstate import canonical, held_advisory_locks, sqlite_locks_free
from sqlalchemy.engine import Engine
from workload import PERIOD, write_usage

from jobs.runtime.ledger import job_runs
from metering import db
from metering.settings import Settings
from metering.timeutil import month_bounds

KILLS = 10
MAX_TRIES = 40
START, END = month_bounds(PERIOD, Settings().zone)
AFTER = (END + timedelta(days=1)).astimezone(UTC).isoformat()
CLOSE_AT = "2026-03-01T03:00:00+09:00"


@dataclass
class Box:
    """Where one database's commands run: its URL, its log directory, the shared inputs."""

    url: str
    work: Path
    inputs: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "HOSTMETER_DATABASE_URL": self.url,
                "HOSTMETER_LOG_DIR": str(self.work / "logs")}

    def argv(self, args: list[str]) -> list[str]:
        return [sys.executable, "-m", "jobs.cli",
                *[a.replace("{inputs}", str(self.inputs)) for a in args]]

    def run(self, args: list[str]) -> float:
        started = time.monotonic()
        done = subprocess.run(self.argv(args), env=self.env(), cwd=self.work,
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, f"{args}: {done.stderr[-2000:]}"
        return time.monotonic() - started


@dataclass(frozen=True)
class Scenario:
    name: str
    prepare: list[list[str]]
    command: list[str]
    finish: list[list[str]] = field(default_factory=list)
    """Default: the command again."""


INGEST = ["ingest", "{inputs}/usage.jsonl"]
CLOSE = ["billing", "close", "--period", PERIOD, "--at", AFTER]
SCENARIOS = [
    Scenario("ingest", [], INGEST),
    Scenario("backfill", [INGEST], ["backfill", "snapshot-usage", "--from", START.isoformat(),
                                    "--to", END.isoformat()]),
    Scenario("close", [INGEST], CLOSE),
    Scenario("rerun", [INGEST, CLOSE, ["billing", "finalize", "--period", PERIOD],
                       ["ingest", "{inputs}/late.jsonl"]],
             ["billing", "rerun", "--period", PERIOD, "--at", AFTER, "--reason", "late posts"]),
    Scenario("finalize", [INGEST, CLOSE], ["billing", "finalize", "--period", PERIOD]),
    Scenario("metrics-aggregate", [], ["metrics", "aggregate", "--logs", "{inputs}/joblogs"]),
    Scenario("scheduled-run", [INGEST],
             ["run", "close-billing-period", "--at", CLOSE_AT, "--trigger", "schedule"],
             finish=[["run", "close-billing-period", "--retry-failed"],
                     # the platform may deliver the trigger again: it must find the key done
                     ["run", "close-billing-period", "--at", CLOSE_AT, "--trigger", "schedule"]]),
]


def _job_logs(path: Path, *, seed: int, runs: int = 6000) -> None:
    """A job log of ``runs`` finished runs (and their starts), seeded."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    with (path / "hostmeter.jsonl").open("w", encoding="utf-8") as f:
        for i in range(runs):
            job = rng.choice(["snapshot-usage", "close-billing-period", "aggregate-job-logs"])
            at = t0 + timedelta(seconds=37 * i)
            run_id = f"r{seed}-{i:06d}"
            common = {"job": job, "run_id": run_id, "logical_time": at.isoformat()}
            f.write(json.dumps({"event": "job_started", "timestamp": at.isoformat(),
                                "level": "info", **common}) + "\n")
            f.write(json.dumps({
                "event": "job_finished", "level": "info",
                "timestamp": (at + timedelta(seconds=rng.randrange(1, 30))).isoformat(),
                "status": rng.choice(["succeeded"] * 8 + ["failed", "partial"]),
                "duration_s": round(rng.uniform(0.1, 30), 3),
                "tenants_expected": 10, "tenants_processed": rng.randrange(8, 11),
                "host_hours": rng.randrange(0, 5000), **common}) + "\n")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    write_usage(root / "usage.jsonl", seed=11)
    write_usage(root / "late.jsonl", seed=12, tenants=3, hosts=8)  # more hosts, late
    _job_logs(root / "joblogs", seed=13)
    return root


@pytest.fixture
def reference_url(empty_db_url: str) -> str:
    engine = db.create_engine(empty_db_url)
    db.upgrade(engine)
    engine.dispose()
    return empty_db_url


def _kill_repeatedly(box: Box, command: list[str], rng: random.Random, typical_s: float,
                     ) -> tuple[int, int]:
    """SIGKILL the command at random moments until :data:`KILLS` kills landed on a live
    process; returns (kills, runs that finished before their kill moment)."""
    kills = finished = 0
    for _ in range(MAX_TRIES):
        if kills >= KILLS:
            break
        proc = subprocess.Popen(box.argv(command), env=box.env(), cwd=box.work,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.2, 0.95) * typical_s)
            finished += 1  # it ended first: a whole run, which the rest must not disturb
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            kills += 1
    return kills, finished


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_sigkill_at_random_moments_leaves_the_database_as_an_uninterrupted_run(
    scenario: Scenario, db_url: str, reference_url: str, engine: Engine, inputs: Path,
    tmp_path: Path, record_property: Callable[[str, object], None],
) -> None:
    (tmp_path / "ref").mkdir()
    (tmp_path / "killed").mkdir()
    reference = Box(reference_url, tmp_path / "ref", inputs)
    killed = Box(db_url, tmp_path / "killed", inputs)
    for step in scenario.prepare:
        reference.run(step)
        killed.run(step)
    typical = reference.run(scenario.command)
    ref_engine = db.create_engine(reference_url)
    try:
        expected = canonical(ref_engine)
    finally:
        ref_engine.dispose()

    rng = random.Random(f"{scenario.name}:{engine.dialect.name}")
    kills, finished = _kill_repeatedly(killed, scenario.command, rng, typical)
    record_property("kills", kills)
    record_property("finished_before_kill", finished)
    assert kills >= KILLS, f"only {kills} kills landed in {MAX_TRIES} tries"
    for step in scenario.finish or [scenario.command]:
        killed.run(step)

    assert canonical(engine) == expected
    with engine.connect() as conn:
        statuses = conn.execute(sa.select(job_runs.c.status)).scalars().all()
    assert "running" not in statuses
    assert held_advisory_locks(engine) == 0
    if engine.dialect.name == "sqlite":
        assert sqlite_locks_free(db_url)
    print(f"{scenario.name} [{engine.dialect.name}]: {kills} kills, {finished} finished first, "
          f"reference {typical:.2f}s, {sum(len(v) for v in expected.values())} rows equal")
