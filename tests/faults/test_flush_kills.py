"""SIGKILL ``flush-usage`` at seeded random moments: the database and Redis end as after one
uninterrupted run.

The same seeded posts (about a thousand tenants, a few hosts each, four UTC hours: two older
than ``release_before``, the hour exactly at it, and the current one; service posts too) are
recorded into two Redis stores (databases 0 and 1 of one private ``redis-server``), in the same
order, so both hold the same keys, values and dictionary ids.

- Reference: ``hostmeter run flush-usage --at T`` once, store A into database A.
- Subject: the same command, store B into database B, started and SIGKILLed after a delay drawn
  uniformly from the whole of the reference run's wall time (start-up, the merge transactions
  and the releases after each commit: a flush commits and releases group by group, so the
  kills fall in both phases), again and again until :data:`KILLS` kills landed while the
  process was alive; then run once more to completion. Every attempt passes ``--force``: an
  attempt that happens to finish must not make the later ones skip; the runner still marks the
  row a killed attempt left ``running`` as abandoned.

After every kill, each tenant is either whole in database B (exactly its rows of database A)
or absent from it with every one of its tenant-hours still in store B: nothing half-written,
nothing released before its commit. At the end, database B holds what database A holds —
host-hours and service-hours by natural keys (tenant, host, hour, kind, the metric *names*
their bits stand for, the count), every tenant, host and metric name, and every other table —
store B holds exactly what store A holds (the old hours released, the others kept, the
dictionaries untouched), no ledger row is left ``running`` and no lock is held.

Checked against deliberately broken copies of ``metering/flush.py`` (run from a copy on
``PYTHONPATH``): releasing a group's hours before its commit fails the first kill that lands
in a merge ("gone from Redis before their commit"), groups that split a tenant's hours over
two transactions fail as "half-written", and releasing ``release_before``'s own hour fails the
reference's check.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from dbstate import canonical, held_advisory_locks, sqlite_locks_free
from redisservers import RedisServer
from sqlalchemy.engine import Engine

from jobs.flush_usage import release_before
from jobs.runtime.ledger import job_runs
from metering import db
from metering import models as m
from metering.hotpath import PostRecorder, epoch_hour
from metering.records import HostPost, ServicePost
from metering.timeutil import floor_hour

pytestmark = pytest.mark.slow

KILLS = 10
MAX_TRIES = 40
TENANTS = 1000
AT = datetime(2026, 3, 10, 12, 2, 30, tzinfo=UTC)
RELEASE_BEFORE = release_before(AT)
NOW = floor_hour(AT)
HOURS = [NOW - timedelta(hours=6), NOW - timedelta(hours=5), RELEASE_BEFORE, NOW]
"""Two hours the flush releases, the first hour it keeps (exactly ``release_before``), and the
current hour."""
USAGE_TABLES = ("tenants", "hosts", "metric_names", "host_hours", "service_hours")


def _posts(seed: int) -> list[HostPost | ServicePost]:
    """Seeded posts: per tenant a few hosts posting in some of :data:`HOURS`, one to three
    posts per host-hour with overlapping names (the OR matters), service posts in some hours."""
    rng = random.Random(seed)
    posts: list[HostPost | ServicePost] = []
    for t in range(TENANTS):
        tenant = f"t-{t:04d}"
        hours = [h for h in HOURS if rng.random() < 0.7] or [rng.choice(HOURS)]
        for h in range(rng.randint(1, 4)):
            kind = "micro" if h == 3 else "standard"
            for hour in hours:
                if rng.random() < 0.1:
                    continue  # this host skipped this hour
                for p in range(rng.randint(1, 3)):
                    first = rng.randrange(40)
                    posts.append(HostPost(
                        tenant=tenant, host=f"h-{h}", kind=kind,
                        at=hour + timedelta(minutes=7 * p + h),
                        metrics=tuple(f"m.{(first + k) % 60}" for k in range(rng.randint(8, 24)))))
        for hour in hours:
            if rng.random() < 0.4:
                for service in rng.sample(["web", "db", "queue"], rng.randint(1, 2)):
                    posts.append(ServicePost(
                        tenant=tenant, service=service, at=hour + timedelta(minutes=30),
                        metrics=tuple(f"req.{k}" for k in range(rng.randint(1, 6)))))
    return posts


@dataclass
class Box:
    """Where one side's commands run: its database, its Redis store, its log directory."""

    db_url: str
    redis_url: str
    work: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "HOSTMETER_DATABASE_URL": self.db_url,
                "HOSTMETER_REDIS_URL": self.redis_url,
                "HOSTMETER_LOG_DIR": str(self.work / "logs")}

    def argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "jobs.cli", "run", "flush-usage", "--at", AT.isoformat(),
                *extra]

    def run(self, *extra: str) -> float:
        started = time.monotonic()
        done = subprocess.run(self.argv(*extra), env=self.env(), cwd=self.work,
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return time.monotonic() - started


def _usage(engine: Engine) -> dict[str, Any]:
    """The usage tables by natural keys, bitmaps decoded into the metric names they stand for
    (ordinals are numbered in the order a flush meets names, which a kill may change)."""
    with engine.connect() as conn:
        tenant_keys = dict(conn.execute(sa.select(m.tenants.c.id, m.tenants.c.key)).all())
        hosts = {i: (tenant_keys[t], k) for i, t, k in conn.execute(
            sa.select(m.hosts.c.id, m.hosts.c.tenant_id, m.hosts.c.key)).all()}
        names: dict[tuple[int, str], dict[int, str]] = {}
        for tid, namespace, name, ordinal in conn.execute(sa.select(
                m.metric_names.c.tenant_id, m.metric_names.c.namespace,
                m.metric_names.c.name, m.metric_names.c.ordinal)).all():
            names.setdefault((tid, namespace), {})[ordinal] = name

        def decoded(tid: int, namespace: str, bits: bytes) -> frozenset[str]:
            n = int.from_bytes(bits, "little")
            table = names.get((tid, namespace), {})
            out = set()
            while n:
                low = n & -n
                out.add(table.get(low.bit_length() - 1, f"?{low.bit_length() - 1}"))
                n ^= low
            return frozenset(out)

        host_hours = {
            (*hosts[hid], hour.isoformat()): (tenant_keys[tid], kind, count,
                                              decoded(tid, "host", bytes(bits)))
            for hid, hour, tid, kind, count, bits in conn.execute(sa.select(
                m.host_hours.c.host_id, m.host_hours.c.hour, m.host_hours.c.tenant_id,
                m.host_hours.c.kind, m.host_hours.c.metric_count, m.host_hours.c.metric_bits))
        }
        service_hours = {
            (tenant_keys[tid], hour.isoformat()): (count, decoded(tid, "service", bytes(bits)))
            for tid, hour, count, bits in conn.execute(sa.select(
                m.service_hours.c.tenant_id, m.service_hours.c.hour,
                m.service_hours.c.metric_count, m.service_hours.c.metric_bits))
        }
        conn.rollback()
    return {
        "tenants": sorted(tenant_keys.values()),
        "hosts": sorted(hosts.values()),
        "metric_names": sorted((tenant_keys[t], ns, name) for (t, ns), byid in names.items()
                               for name in byid.values()),
        "host_hours": host_hours,
        "service_hours": service_hours,
    }


def _differences(actual: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """Per table of :func:`_usage` or per Redis store, what differs: counts and a few keys
    (a readable failure instead of two dumps of thousands of rows)."""
    out: dict[str, Any] = {}
    for table in expected.keys() | actual.keys():
        got, want = actual.get(table, {}), expected.get(table, {})
        if not isinstance(want, dict):
            got, want = dict.fromkeys(got), dict.fromkeys(want)
        missing = sorted(want.keys() - got.keys(), key=repr)
        extra = sorted(got.keys() - want.keys(), key=repr)
        changed = sorted((k for k in want.keys() & got.keys() if want[k] != got[k]), key=repr)
        if missing or extra or changed:
            out[table] = {"missing": len(missing), "extra": len(extra),
                          "changed": len(changed), "e.g.": (missing + extra + changed)[:3]}
    return out


def _store(url: str) -> dict[bytes, Any]:
    """Every key of a Redis database with its value (strings and hashes)."""
    client = redis.Redis.from_url(url)
    try:
        out: dict[bytes, Any] = {}
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            out[key] = client.hgetall(key) if kind == b"hash" else client.get(key)
        return out
    finally:
        client.close()


def _hour_keys(store: dict[bytes, Any]) -> dict[int, int]:
    """Tenant-hours per epoch hour (by their posts counters)."""
    out: dict[int, int] = {}
    for key in store:
        if b":posts:" in key:
            hour = int(key.rsplit(b":", 1)[1])
            out[hour] = out.get(hour, 0) + 1
    return out


def _by_tenant(usage: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """:func:`_usage` split by tenant: the tenant's hosts, names, host-hours, service-hours."""
    out: dict[str, dict[str, Any]] = {
        t: {"hosts": set(), "metric_names": set(), "host_hours": {}, "service_hours": {}}
        for t in usage["tenants"]}
    for host in usage["hosts"]:
        out[host[0]]["hosts"].add(host)
    for name in usage["metric_names"]:
        out[name[0]]["metric_names"].add(name)
    for table in ("host_hours", "service_hours"):
        for key, value in usage[table].items():
            out[key[0]][table][key] = value
    return out


def _tenant_hours(store: Iterable[bytes]) -> dict[str, set[bytes]]:
    """Tenant → the posts counters (one per tenant-hour) a Redis store holds."""
    out: dict[str, set[bytes]] = {}
    for key in store:
        if b":posts:" in key:
            out.setdefault(key[key.index(b"{") + 1:key.index(b"}")].decode(), set()).add(key)
    return out


@dataclass
class Kills:
    """What the kills hit."""

    landed: int = 0
    """Attempts SIGKILLed while alive."""
    finished: int = 0
    """Attempts that ended before their kill moment (whole runs the others must not disturb)."""
    in_job: int = 0
    """Kills that landed inside the job: they left the attempt's ledger row ``running``."""
    after_commit: int = 0
    """Kills that landed after the attempt had committed a group of tenants new to the
    database."""
    after_release: int = 0
    """Kills that landed after the attempt had released at least one tenant-hour."""
    delays: list[float] = field(default_factory=list)


def _kill_repeatedly(box: Box, engine: Engine, rng: random.Random, typical_s: float,
                     expected: dict[str, Any], initial: dict[bytes, Any]) -> Kills:
    """SIGKILL the flush at random moments until :data:`KILLS` kills landed on a live process,
    each after a delay uniform over the length of a whole run (``typical_s``, or the last
    attempt that finished first, if shorter).
    After each kill, every tenant is whole in the database or absent from it, and an absent
    tenant still has every tenant-hour in Redis: nothing is half-written, nothing is lost."""
    kills = Kills()
    want = _by_tenant(expected)
    held = _tenant_hours(initial)
    complete = 0
    span = typical_s
    client = redis.Redis.from_url(box.redis_url)
    try:
        for _ in range(MAX_TRIES):
            if kills.landed >= KILLS:
                break
            with engine.connect() as conn:
                rows_before = conn.execute(sa.select(sa.func.count()).select_from(
                    job_runs)).scalar_one()
                conn.rollback()
            keys_before = client.dbsize()
            delay = rng.uniform(0.0, 1.0) * span
            started = time.monotonic()
            proc = subprocess.Popen(box.argv("--force"), env=box.env(), cwd=box.work,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                proc.wait(timeout=delay)
                assert proc.returncode == 0
                kills.finished += 1
                # a whole run now: what is left to flush takes this long (the released hours
                # are no longer read), so later kills are spread over this
                span = min(span, time.monotonic() - started)
                continue
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
            if proc.returncode != -signal.SIGKILL:  # it exited between the wait and the kill
                assert proc.returncode == 0
                kills.finished += 1
                continue
            kills.landed += 1
            kills.delays.append(delay)
            with engine.connect() as conn:
                statuses = conn.execute(sa.select(job_runs.c.status).order_by(
                    job_runs.c.started_at)).scalars().all()
                conn.rollback()
            # its row is left running (inside the job) unless the kill landed before the row
            # was written (start-up) or after the run had recorded its end (shutting down)
            kills.in_job += len(statuses) > rows_before and statuses[-1] == "running"
            kills.after_release += client.dbsize() < keys_before

            got = _by_tenant(_usage(engine))
            now_held = _tenant_hours(client.scan_iter(match="hm:*:posts:*", count=1000))
            half = sorted(t for t in got if got[t] != want.get(t))
            lost = sorted(t for t in want if t not in got
                          and not held[t] <= now_held.get(t, set()))
            assert not half and not lost, (
                f"kill {kills.landed} after {delay:.2f}s: half-written tenants {half[:5]} "
                f"({len(half)}), tenants gone from Redis before their commit {lost[:5]} "
                f"({len(lost)})")
            kills.after_commit += len(got) > complete
            complete = len(got)
    finally:
        client.close()
    return kills


def _work_seconds(logs: Path) -> float:
    """The flush's own duration (``job_finished``'s ``duration_s``), start-up not included."""
    for line in (logs / "hostmeter.jsonl").read_text("utf-8").splitlines():
        event = json.loads(line)
        if event.get("event") == "job_finished" and event.get("job") == "flush-usage":
            return float(event["duration_s"])
    raise AssertionError(f"no job_finished in {logs}")


def test_sigkill_of_flush_usage_leaves_database_and_redis_as_an_uninterrupted_run(
    redis_single: RedisServer, db_url: str, engine: Engine, backend: str, tmp_path: Path,
    request: pytest.FixtureRequest, record_property: Callable[[str, object], None],
) -> None:
    base = redis_single.url.rsplit("/", 1)[0]
    store_a, store_b = f"{base}/0", f"{base}/1"
    posts = _posts(seed=21)
    for url in (store_a, store_b):
        recorder = PostRecorder.from_url(url, timeout=30)
        try:
            assert recorder.record_many(posts).recorded == len(posts)
        finally:
            recorder.close()
    initial = _store(store_a)
    assert _store(store_b) == initial
    held = _hour_keys(initial)
    assert set(held) == {epoch_hour(h) for h in HOURS}

    reference_db = request.getfixturevalue("empty_db_url")
    ref_engine = db.create_engine(reference_db)
    (tmp_path / "ref").mkdir()
    (tmp_path / "killed").mkdir()
    reference = Box(reference_db, store_a, tmp_path / "ref")
    subject = Box(db_url, store_b, tmp_path / "killed")
    try:
        db.upgrade(ref_engine)
        typical = reference.run()
        expected = _usage(ref_engine)
        expected_all = canonical(ref_engine)
    finally:
        ref_engine.dispose()
    work = _work_seconds(tmp_path / "ref" / "logs")
    # The reference did the work this test is about: every tenant-hour merged, the old ones
    # released, the others (release_before's hour among them) kept.
    final_a = _store(store_a)
    assert _hour_keys(final_a) == {h: n for h, n in held.items()
                                   if h >= epoch_hour(RELEASE_BEFORE)}
    assert len(expected["host_hours"]) > 5000 and len(expected["service_hours"]) > 1000

    rng = random.Random(f"flush-usage:{backend}")
    kills = _kill_repeatedly(subject, engine, rng, typical, expected, initial)
    record_property("kills", kills.landed)
    record_property("finished_before_kill", kills.finished)
    assert kills.landed >= KILLS, f"only {kills.landed} kills landed in {MAX_TRIES} tries"
    subject.run("--force")

    assert _differences(_usage(engine), expected) == {}
    got_all = canonical(engine)
    assert {k: v for k, v in got_all.items() if k not in USAGE_TABLES} == {
        k: v for k, v in expected_all.items() if k not in USAGE_TABLES}
    assert _differences({"redis": _store(store_b)}, {"redis": final_a}) == {}
    with engine.connect() as conn:
        statuses = conn.execute(sa.select(job_runs.c.status).order_by(
            job_runs.c.started_at)).scalars().all()
        conn.rollback()
    assert "running" not in statuses
    assert statuses[-1] == "succeeded"
    assert statuses.count("failed") == kills.in_job  # each row a kill left, found abandoned
    assert held_advisory_locks(engine) == 0
    if backend == "sqlite":
        assert sqlite_locks_free(db_url)
    same_ordinals = all(got_all[t] == expected_all[t] for t in USAGE_TABLES)
    print(f"flush-usage [{backend}]: {kills.landed} kills ({kills.in_job} inside the job, "
          f"{kills.after_commit} after a commit, {kills.after_release} after a release), "
          f"{kills.finished} finished first; reference {typical:.2f}s ({work:.2f}s of flush), "
          f"delays {[round(d, 2) for d in sorted(kills.delays)]}; {len(expected['host_hours'])} "
          f"host-hours, {len(expected['service_hours'])} service-hours and the Redis store "
          f"equal; ordinals {'also equal' if same_ordinals else 'differ'}")
