"""The Mackerel export under a hostile endpoint: exact at the end, every pass within its budget.

A seeded sequence of job logs is appended over many ``aggregate-job-logs`` passes (5 minutes
apart in logical time): new runs, second runs landing in buckets already exported, a half-written
line, malformed lines, and a late log file with buckets hours old (some past Mackerel's window).
Meanwhile the Mackerel stand-in (a real HTTP server on 127.0.0.1) cycles through 429 with short
and long ``Retry-After``, 500/503, outages, requests that hang (some of which land later, over
newer values), answers after the client's timeout, and recoveries. After the faults stop and
clean passes run, Mackerel must hold exactly the store's value for every bucket in its window,
and no pass may have run past its budget.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from jobs import aggregate_job_logs
from jobs.monitoring.mackerel import MackerelError
from jobs.runtime.context import JobContext
from metering.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
from mackerelfake import Fault, MackerelStandIn, store_state

KEY = "mkr-fault-campaign-key-7c1d"
T0 = datetime(2026, 11, 1, 0, 2, 30, tzinfo=UTC)
STEP = timedelta(minutes=5)
BUDGET_S = 1.5
JOBS = ("snapshot-usage", "close-billing-period", "prune-usage", "flush-usage")
STATUSES = ("succeeded", "succeeded", "succeeded", "failed", "partial")

Diff = dict[str, int]


def _differences(store: dict[str, dict[int, float]], held: dict[str, dict[int, float]],
                 window_start: int) -> Diff:
    """Lost (in the store, not in Mackerel), stale (another value), extra (only in Mackerel)."""
    out = {"lost": 0, "stale": 0, "extra": 0}
    for name in store.keys() | held.keys():
        ours = store.get(name, {})
        theirs = {t: v for t, v in held.get(name, {}).items() if t >= window_start}
        for t in ours.keys() | theirs.keys():
            if t not in theirs:
                out["lost"] += 1
            elif t not in ours:
                out["extra"] += 1
            elif ours[t] != theirs[t]:
                out["stale"] += 1
    return out


@dataclass
class Logs:
    """Job logs written the way the jobs write them, from a seeded generator."""

    root: Path
    rng: random.Random
    runs: int = 0

    def line(self, at: datetime, job: str | None = None) -> str:
        self.runs += 1
        job = job or self.rng.choice(JOBS)
        return json.dumps({
            "event": "job_finished", "level": "info", "timestamp": at.isoformat(), "job": job,
            "run_id": f"run-{self.runs:05d}", "logical_time": at.isoformat(),
            "status": self.rng.choice(STATUSES),
            "duration_s": round(self.rng.uniform(0.1, 90.0), 3),
            "tenants_expected": self.rng.randint(5, 40),
            "tenants_processed": self.rng.randint(0, 40),
            "host_hours": self.rng.randint(0, 5000),
            "invoices_written": self.rng.randint(0, 9),
            "billed_amount": self.rng.randint(0, 10**6),
        }) + "\n"  # fmt: skip

    def append(self, name: str, text: str) -> None:
        with (self.root / name).open("a") as f:
            f.write(text)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pass:
    """One pass of the campaign: how Mackerel behaves, and what else happens first."""

    fault: str = "ok"
    rewrite: bool = False
    """Add a run to the previous pass's bucket (same job): its points change after they were
    posted (and maybe taken by a request still in flight)."""
    release: bool = False
    """Before the pass, the requests held by the stand-in land (those that land)."""


EPISODES: list[list[Pass]] = [
    [Pass(fault="429-short")],
    [Pass(fault="429-long"), Pass(), Pass()],  # the second pass is before Retry-After ends
    [Pass(fault="5xx")],
    [Pass(fault="outage"), Pass()],
    [Pass(fault="hang"), Pass()],
    [Pass(fault="hang-lands"), Pass(rewrite=True), Pass(release=True)],
    [Pass(fault="late"), Pass(rewrite=True)],
    [Pass(fault="hang-lands"), Pass(fault="late", rewrite=True), Pass(release=True), Pass()],
    [Pass()],
    [Pass(fault="5xx"), Pass(rewrite=True)],
]


def _script(kind: str, mackerel: MackerelStandIn) -> None:
    """Script the stand-in for one pass."""
    mackerel.always(None)
    if kind == "429-short":  # retried within the pass
        mackerel.then(Fault.refuse(429, retry_after="0.2"))
    elif kind == "429-long":  # longer than the pass: the next passes must wait (capped 300 s)
        mackerel.then(Fault.refuse(429, retry_after="600"))
    elif kind == "5xx":
        mackerel.then(Fault.refuse(500), Fault.refuse(503))
    elif kind == "outage":
        mackerel.always(Fault.refuse(503))
    elif kind == "hang":
        mackerel.always(Fault.hang())
    elif kind == "hang-lands":
        mackerel.always(Fault.hang(lands=True))
    elif kind == "late":
        mackerel.always(Fault.late())
    elif kind == "graphs-down":
        mackerel.then(Fault.refuse(503), endpoint="graph-defs")


def _campaign(rng: random.Random) -> list[Pass]:
    episodes = list(EPISODES)
    rng.shuffle(episodes)
    return [Pass(fault="graphs-down"), *(p for episode in episodes for p in episode)]


@pytest.fixture
def mackerel() -> Iterator[MackerelStandIn]:
    with MackerelStandIn(KEY, late_s=3.0, max_hold_s=120.0) as stand_in:
        yield stand_in


@pytest.mark.parametrize("seed", [20261101])
def test_mackerel_holds_exactly_the_store_after_a_fault_campaign(
    engine: Engine, tmp_path: Path, mackerel: MackerelStandIn, seed: int,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MACKEREL_API_KEY", KEY)
    monkeypatch.setenv("MACKEREL_API_BASE", mackerel.base_url)
    monkeypatch.setenv("HOSTMETER_AGGREGATE_BUDGET_S", str(BUDGET_S))
    rng = random.Random(seed)
    root = tmp_path / "logs"
    root.mkdir()
    logs = Logs(root=root, rng=rng)
    durations: list[float] = []
    failed_passes = 0
    stale_seen = 0  # stale values a late-landing request wrote over newer ones
    rewritten = 0  # runs added to buckets Mackerel already held
    previous: tuple[datetime, str] | None = None  # the last pass's bucket instant and job

    def run_pass(at: datetime) -> None:
        nonlocal failed_passes
        ctx = JobContext(engine=engine, settings=Settings(), clock=lambda: at)
        start = time.monotonic()
        try:
            aggregate_job_logs.run(ctx, at, logs=[str(root)], exports=["mackerel"])
        except MackerelError:
            failed_passes += 1
        durations.append(time.monotonic() - start)

    def window(at: datetime) -> int:
        return int((at - timedelta(days=1)).timestamp())

    half = ""
    at = T0
    for i, step in enumerate(_campaign(rng)):
        at = T0 + i * STEP
        if step.release and mackerel.release():
            stale_seen += _differences(store_state(engine, at), mackerel.state(),
                                       window(at))["stale"]
        job = rng.choice(JOBS)
        lines = [logs.line(at, job)] + [logs.line(at - timedelta(seconds=rng.uniform(0, 280)))
                                         for _ in range(rng.randint(0, 2))]
        held = {t for times in mackerel.state().values() for t in times}
        if step.rewrite and previous is not None:
            lines.append(logs.line(previous[0] - timedelta(seconds=1), previous[1]))
            rewritten += 1
        elif held and rng.random() < 0.4:  # a second run in some bucket already exported
            bucket = rng.choice(sorted(held))
            lines.append(logs.line(datetime.fromtimestamp(bucket + rng.randint(0, 299), UTC)))
            rewritten += 1
        logs.append(rng.choice(["hostmeter.jsonl", "worker-2.jsonl"]), "".join(lines))
        if i == 7:
            logs.append("hostmeter.jsonl", "not json at all\n")
        if i == 9:  # a line still being written when the pass reads
            half = logs.line(at - timedelta(seconds=5))
            logs.append("worker-2.jsonl", half[:40])
        if i == 10:
            logs.append("worker-2.jsonl", half[40:])
        if i == 12:  # a late log file: buckets 2 to 30 hours old (the oldest out of window)
            logs.append("late-host.jsonl", "".join(
                logs.line(at - timedelta(hours=h, seconds=rng.uniform(0, 299)))
                for h in (2, 5, 11, 20, 23.5, 26, 30)))
        _script(step.fault, mackerel)
        run_pass(at)
        previous = (at, job)

    # The faults stop: what was still held lands (over newer values), then clean passes.
    mackerel.always(None)
    mackerel.release()
    for _ in range(3):
        at += STEP
        run_pass(at)

    start = window(at)
    store = store_state(engine, at)
    held_now = mackerel.state()
    diff = _differences(store, held_now, start)
    kinds = {r.fault.kind for r in mackerel.requests}
    with capsys.disabled():
        print(f"\nmackerel faults [{engine.dialect.name}] passes={len(durations)} "
              f"failed={failed_passes} store_points={sum(len(v) for v in store.values())} "
              f"held_in_window={sum(len(v) for v in held_window(held_now, start).values())} "
              f"held_total={sum(len(v) for v in held_now.values())} lost={diff['lost']} "
              f"stale={diff['stale']} extra={diff['extra']} stale_seen_mid_campaign={stale_seen} "
              f"rewritten={rewritten} requests={len(mackerel.requests)} "
              f"longest_pass_s={max(durations):.2f}")

    # The campaign did what it says: every fault kind was met, stale values were written over
    # newer ones, exported buckets were rewritten, passes failed and were caught up.
    assert {"ok", "status", "hang", "late"} <= kinds
    assert stale_seen > 0 and rewritten > 0 and failed_passes > 0
    assert mackerel.graph_defs, "the graph definitions were posted in the end"
    # Exact at the end: the same name → {time: value} map, nothing lost, stale or extra.
    assert held_window(held_now, start) == store
    assert diff == {"lost": 0, "stale": 0, "extra": 0}
    # Every pass ended within its budget (a generous margin for a loaded machine).
    assert max(durations) < BUDGET_S + 1.0, durations


def held_window(held: dict[str, dict[int, float]], start: int) -> dict[str, dict[int, float]]:
    """Mackerel's state restricted to its window (names with no point there dropped)."""
    out = {name: {t: v for t, v in times.items() if t >= start} for name, times in held.items()}
    return {name: times for name, times in out.items() if times}

