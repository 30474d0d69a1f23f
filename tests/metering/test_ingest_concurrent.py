"""Concurrent ingest on PostgreSQL, with real ``hostmeter ingest -`` processes.

Each process reads standard input from a pipe the test writes to, so the test decides exactly
when each input names each tenant and when it ends (its transaction stays open until then), and
watches ``pg_locks`` to know what each process holds or waits for. SQLite admits one writer at
a time, so these run on PostgreSQL only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from metering import db
from metering.ingest import TENANT_LOCK_SPACE

ROOT = Path(__file__).resolve().parents[2]
OURS = ("locktype = 'advisory' AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())")
"""pg_locks rows of this test's database (other databases' tests may run at the same time)."""


@pytest.fixture
def pg_url(backend: str, db_url: str) -> str:
    if backend != "postgresql":
        pytest.skip("several ingest writers at once: PostgreSQL only (SQLite has one writer)")
    return db_url


def post(tenant: str, host: str, minute: int, metrics: list[str], kind: str = "standard") -> str:
    return json.dumps({"type": "host_post", "tenant": tenant, "host": host, "kind": kind,
                       "at": f"2026-10-15T10:{minute:02d}:00Z", "metrics": metrics}) + "\n"


class Ingest:
    """``hostmeter ingest - --format json`` fed line by line."""

    def __init__(self, url: str, tmp: Path, name: str) -> None:
        env = {**os.environ, "HOSTMETER_DATABASE_URL": url, "HOSTMETER_LOG_DIR": str(tmp)}
        self.lines: list[str] = []
        self.err = (tmp / f"{name}.err").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "ingest", "-", "--format", "json"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, cwd=ROOT, env=env,
        )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.lines.append(line)
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()

    def finish(self, timeout: float = 60) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=timeout)  # closes standard input first
        self.err.close()
        assert self.proc.returncode == 0, Path(self.err.name).read_text()
        return dict(json.loads(out))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


@pytest.fixture
def ingests(pg_url: str, tmp_path: Path) -> Iterator[Any]:
    started: list[Ingest] = []

    def start(name: str) -> Ingest:
        started.append(Ingest(pg_url, tmp_path, name))
        return started[-1]

    yield start
    for p in started:
        p.kill()


def tenant_locks(url: str, *, granted: bool) -> int:
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(
                sa.text(f"SELECT count(*) FROM pg_locks WHERE {OURS} "
                        "AND classid = :space AND granted = :granted"),
                {"space": TENANT_LOCK_SPACE, "granted": granted},
            ).scalar_one())
    finally:
        engine.dispose()


def held_by_one(url: str) -> int:
    """The most tenant locks one backend holds."""
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(
                sa.text("SELECT coalesce(max(n), 0) FROM (SELECT pid, count(*) AS n "
                        f"FROM pg_locks WHERE {OURS} AND classid = :space "
                        "AND granted GROUP BY pid) AS held"),
                {"space": TENANT_LOCK_SPACE},
            ).scalar_one())
    finally:
        engine.dispose()


def wait_for(check: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def recorded(url: str) -> dict[tuple[str, str, str], tuple[str, frozenset[str]]]:
    """(tenant, host, hour) → (kind, names), decoded through each tenant's dictionary, whose
    ordinals must be dense (0 … n-1)."""
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            names: dict[int, dict[int, str]] = {}
            for tenant_id, name, ordinal in conn.execute(sa.text(
                "SELECT tenant_id, name, ordinal FROM metric_names WHERE namespace = 'host'"
            )):
                names.setdefault(tenant_id, {})[ordinal] = name
            for dictionary in names.values():
                assert sorted(dictionary) == list(range(len(dictionary)))
            out = {}
            for tenant, host, hour, kind, count, bits in conn.execute(sa.text(
                "SELECT t.key, h.key, hh.hour, hh.kind, hh.metric_count, hh.metric_bits "
                "FROM host_hours hh JOIN hosts h ON h.id = hh.host_id "
                "JOIN tenants t ON t.id = hh.tenant_id"
            )):
                value = int.from_bytes(bytes(bits), "little")
                got = frozenset(names[_tenant_id(conn, tenant)][i]
                                for i in range(value.bit_length()) if value >> i & 1)
                assert len(got) == count
                out[(tenant, host, hour.isoformat())] = (kind, got)
            return out
    finally:
        engine.dispose()


def _tenant_id(conn: sa.Connection, key: str) -> int:
    return int(conn.execute(sa.text("SELECT id FROM tenants WHERE key = :k"),
                            {"k": key}).scalar_one())


def expected(*inputs: list[str]) -> dict[tuple[str, str, str], tuple[str, frozenset[str]]]:
    """What running the inputs one after the other records: per host-hour, the union of the
    names and ``standard`` if any post said so."""
    acc: dict[tuple[str, str, str], tuple[str, frozenset[str]]] = {}
    for lines in inputs:
        for line in lines:
            r = json.loads(line)
            key = (r["tenant"], r["host"], r["at"][:13].replace("T", " ") + ":00:00+00:00")
            kind, names = acc.get(key, ("micro", frozenset()))
            acc[key] = ("standard" if "standard" in (kind, r["kind"]) else "micro",
                        names | frozenset(r["metrics"]))
    return {(t, h, hour.replace(" ", "T")): v for (t, h, hour), v in acc.items()}


def test_disjoint_tenants_run_in_parallel(pg_url: str, ingests: Any) -> None:
    """B, on other tenants, commits while A's transaction is still open: they do not queue
    behind one lock (the bug: one global lock made B wait for A to end)."""
    a, b = ingests("a"), ingests("b")
    a.send(post("acme", "h-1", 1, ["cpu", "mem"]))
    wait_for(lambda: tenant_locks(pg_url, granted=True) == 1, "A to lock its tenant")
    b.send(post("zeta", "z-1", 2, ["cpu", "disk"], kind="micro"))
    b.send(post("zeta", "z-2", 3, ["net"]))
    out_b = b.finish(timeout=30)  # A is still open: this must not wait for it
    assert a.proc.poll() is None
    assert out_b["records"] == 2 and out_b["tenants"] == 1
    a.send(post("acme", "h-1", 4, ["disk"]))
    out_a = a.finish()
    assert out_a["records"] == 2 and out_a["hosts"] == 1
    assert recorded(pg_url) == expected(a.lines, b.lines)


def test_same_tenant_waits_and_equals_sequential(pg_url: str, ingests: Any) -> None:
    """B names A's tenant: it waits for A's commit, then merges on top of A's rows, new names
    numbered after A's (the bug: both read the same bitmap or number two names alike)."""
    a, b = ingests("a"), ingests("b")
    a.send(post("acme", "h-1", 1, ["cpu", "mem"]))
    wait_for(lambda: tenant_locks(pg_url, granted=True) == 1, "A to lock its tenant")
    b.send(post("acme", "h-1", 2, ["disk", "cpu"]))
    b.send(post("acme", "h-2", 2, ["net"], kind="micro"))
    wait_for(lambda: tenant_locks(pg_url, granted=False) == 1, "B to wait for the tenant")
    a.send(post("acme", "h-1", 3, ["swap"], kind="micro"))
    a.send(post("acme", "h-2", 3, ["io"]))
    time.sleep(0.3)
    assert b.proc.poll() is None  # still waiting for A
    a.finish()
    b.finish()
    got = recorded(pg_url)
    assert got == expected(a.lines, b.lines)
    assert got[("acme", "h-1", "2026-10-15T10:00:00+00:00")] == (
        "standard", frozenset({"cpu", "mem", "disk", "swap"}))


def test_opposite_orders_deadlock_and_are_run_again(pg_url: str, ingests: Any) -> None:
    """A holds acme and wants zeta; B holds zeta and wants acme. PostgreSQL aborts one of
    them; it runs its input again (replayed from standard input) after the other commits.
    Both exit 0 and the database holds exactly both inputs (the bug: the aborted input fails,
    or is half counted)."""
    a, b = ingests("a"), ingests("b")
    a.send(post("acme", "h-1", 1, ["cpu"]))
    wait_for(lambda: tenant_locks(pg_url, granted=True) == 1, "A to lock acme")
    b.send(post("zeta", "z-1", 1, ["mem"]))
    wait_for(lambda: tenant_locks(pg_url, granted=True) == 2, "B to lock zeta")
    a.send(post("zeta", "z-1", 2, ["disk"]))
    wait_for(lambda: tenant_locks(pg_url, granted=False) == 1, "A to wait for zeta")
    b.send(post("acme", "h-1", 2, ["net"]))  # the deadlock: one of them is aborted
    wait_for(lambda: held_by_one(pg_url) == 2, "one of them to hold both tenants", 30)
    out = {}
    for p in (a, b):  # both inputs end, then both are awaited
        p.proc.stdin.close()  # type: ignore[union-attr]
        p.proc.stdin = None
    for name, p in (("a", a), ("b", b)):
        stdout, _ = p.proc.communicate(timeout=60)
        p.err.close()
        assert p.proc.returncode == 0, Path(p.err.name).read_text()
        out[name] = json.loads(stdout)
    assert out["a"]["records"] == 2 and out["b"]["records"] == 2
    assert out["a"]["tenants"] == 2 and out["b"]["tenants"] == 2
    assert recorded(pg_url) == expected(a.lines, b.lines)


def test_many_tenants_take_the_ingest_lock_exclusively(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past TENANT_LOCKS tenants an input stops taking a lock per tenant and holds the ingest
    lock exclusively (the bug: thousands of tenant locks exhaust PostgreSQL's lock table)."""
    from metering import ingest

    monkeypatch.setattr(ingest, "TENANT_LOCKS", 2)
    lines = [post(f"t-{i}", "h-1", i, ["cpu"]) for i in range(5)]
    modes: list[tuple[int, int]] = []
    watcher = db.create_engine(pg_url)

    def look(lineno: int) -> None:
        if lineno == len(lines):  # the four tenants before this line have been seen
            with watcher.connect() as conn:
                exclusive = conn.execute(sa.text(
                    f"SELECT count(*) FROM pg_locks WHERE {OURS} AND granted "
                    "AND mode = 'ExclusiveLock' AND objsubid = 1 "
                    "AND (classid::bigint << 32) + objid::bigint = :k"
                ), {"k": ingest.INGEST_LOCK_KEY}).scalar_one()
                tenants = conn.execute(sa.text(
                    f"SELECT count(*) FROM pg_locks WHERE {OURS} "
                    "AND classid = :space"), {"space": TENANT_LOCK_SPACE}).scalar_one()
            modes.append((int(exclusive), int(tenants)))

    engine = db.create_engine(pg_url)
    try:
        summary = ingest.ingest_lines(engine, lines, hold_keys=1, on_progress=look)
    finally:
        engine.dispose()
        watcher.dispose()
    assert summary.tenants == 5
    assert modes == [(1, 2)]  # exclusive, and no tenant lock past the first two
    assert len(recorded(pg_url)) == 5
