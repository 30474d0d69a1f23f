"""What the hot-path tests share: a generated fleet of posts, the same posts as ingest lines and
as ``redis-cli`` commands, and the database and Redis read back by natural keys.

The fleet (:func:`fleet`) is February 2026 in the billing zone (Asia/Tokyo), so the month can be
closed cheaply (672 hours). Nine tenants with skewed host counts, standard and micro hosts (one
switching kind within an hour), about a hundred names per post, most of them the same minute
after minute and a few rotating through a pool (so distinct counts, not post counts, decide the
overage), a name twice in one post, a post of 1,205 names (more than one ``HMGET`` chunk of
``record.lua``), service posts, posts every minute to every five minutes, a post a microsecond
before an hour and one at its first instant, and some posts delivered twice.

Its tenants fall on all three nodes of the test cluster (slots 0–5460, 5461–10922,
10923–16383): tenants of one node only would let a flush that scans one primary pass.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from redisservers import REDIS_CLI
from sqlalchemy.engine import Engine

from billing import models as bm
from billing.service import BillingRequest, close_period
from jobs import snapshot_usage
from jobs.runtime.context import JobContext, run_job
from metering import db
from metering import models as m
from metering.hotpath import PostRecorder, script, script_sha
from metering.records import HostPost, PlanChange, ServicePost
from metering.settings import Settings
from metering.timeutil import HOUR, month_bounds

__all__ = [
    "AFTER", "END", "PERIOD", "START", "ZONE", "Fleet", "billed", "cli_commands", "close_month",
    "evalsha_line", "fleet", "ingest_line", "load_record_script", "protocol_call", "record_all",
    "recorded", "redis_cli", "redis_content", "second_database", "snapshot",
]

Post = HostPost | ServicePost

ZONE = Settings().zone
PERIOD = "2026-02"
START, END = month_bounds(PERIOD, ZONE)  # 2026-01-31T15:00Z .. 2026-02-28T15:00Z
AFTER = END + 3 * HOUR
FIRST = START  # the first hour of the month (its first post is at its first instant)
BEFORE = START - HOUR  # January's last hour (a post a microsecond before the month)
MID = datetime(2026, 2, 10, 9, tzinfo=UTC)
HOURS = (BEFORE, FIRST, MID, MID + HOUR)

# tenant → (plan, [(host, kind, minutes between posts)], services)
TENANTS: dict[str, tuple[str, list[tuple[str, str, int]], int]] = {
    "acme": ("standard", [*((f"a-{i}", "standard", 1 + i % 3) for i in range(10)),
                          ("a-micro-1", "micro", 1), ("a-micro-2", "micro", 5)], 2),
    "globex": ("standard", [("g-1", "standard", 1), ("g-2", "switch", 2),
                            ("g-3", "micro", 3), ("g-4", "standard", 5), ("g-5", "standard", 1)],
               1),
    "umbrella:東京": ("standard", [("ホスト-1", "standard", 1), ("host two", "micro", 2),
                                  ('h"3\\', "standard", 4)], 1),
    "stark": ("standard", [("s-1", "standard", 2), ("s-2", "standard", 2)], 0),
    "wayne/ent": ("standard", [("w-1", "standard", 1)], 1),
    "hooli": ("trial", [(f"hl-{i}", "standard", 2) for i in range(4)], 1),
    "free-co": ("free", [("f-1", "standard", 1), ("f-2", "micro", 3)], 0),
    "tiny": ("standard", [("t-1", "micro", 5)], 0),
    "initech": ("standard", [], 3),  # service posts only: the minimum charge and service overage
}

BASE = [f"custom.app.metric_{i}" for i in range(80)] + [
    "loadavg5", "cpu.user.percentage", "cpu.system.percentage", "memory.used", "memory.free",
    "disk.sda.reads.delta", "disk.sda.writes.delta", "interface.eth0.rxBytes.delta",
    "interface.eth0.txBytes.delta", "filesystem.dev_root.size", "filesystem.dev_root.used",
    "custom.名前.値", "custom.with space", 'custom."quoted"', "custom.back\\slash",
]  # 95 names every post carries
ROTATING = [f"custom.rotating.r{i}" for i in range(160)]
MICRO = [f"micro.metric_{i}" for i in range(40)]
SERVICE_ROTATING = [f"endpoint./api/v{i}" for i in range(130)]


@dataclass(frozen=True, slots=True)
class Fleet:
    posts: tuple[Post, ...]
    """Every delivery, in time order (some posts twice)."""
    plans: tuple[PlanChange, ...]
    hours: tuple[datetime, ...]
    """The UTC hours the posts fall in."""

    @property
    def tenants(self) -> list[str]:
        return sorted(TENANTS)

    def lines(self) -> list[str]:
        """Plans and posts as ``hostmeter ingest`` lines."""
        return [*map(ingest_line, self.plans), *map(ingest_line, self.posts)]


def _host_names(rng: random.Random, kind: str, minute: int, serial: int) -> list[str]:
    if kind == "micro":
        return [*MICRO[:25 + serial % 3], MICRO[25 + (minute + serial) % 15]]
    start = (minute * 7 + serial * 13) % len(ROTATING)
    rotating = [ROTATING[(start + k) % len(ROTATING)] for k in range(6)]
    names = BASE + rotating
    rng.shuffle(names)  # the order of names in a post does not matter
    return names


def fleet(*, seed: int = 20260210, minutes: int = 60) -> Fleet:
    """The fleet of the module docstring; ``minutes`` of each hour are posted (fewer: faster)."""
    rng = random.Random(seed)
    posts: list[Post] = []
    plans = tuple(PlanChange(tenant=t, plan=plan, at=START) for t, (plan, _, _) in TENANTS.items())
    for hour in HOURS:
        for tenant, (_, hosts, services) in TENANTS.items():
            if hour == BEFORE and tenant not in ("acme", "globex"):
                continue
            for serial, (host, kind, every) in enumerate(hosts):
                for minute in range(serial % every, minutes, every):
                    at = hour + timedelta(minutes=minute, seconds=rng.randrange(60))
                    this = kind
                    if kind == "switch":  # micro in the first half hour, then standard
                        this = "micro" if minute < 30 else "standard"
                    names = _host_names(rng, this, minute, serial)
                    if minute == 7 and serial == 0:
                        names = [*names, names[0], "dup.name", "dup.name"]  # twice in one post
                    posts.append(HostPost(tenant=tenant, host=host, kind=this, at=at,
                                          metrics=tuple(names)))
            for s in range(services):
                service = ("web", "db", "batch")[s]
                for minute in range(s, minutes, 5):
                    at = hour + timedelta(minutes=minute, seconds=rng.randrange(60))
                    start = (minute * 3 + s * 41) % len(SERVICE_ROTATING)
                    names = ["req.count", "latency.p99", *(
                        SERVICE_ROTATING[(start + k) % len(SERVICE_ROTATING)] for k in range(4))]
                    posts.append(ServicePost(tenant=tenant, service=service, at=at,
                                             metrics=tuple(names)))
    # the edges of an hour: a microsecond before the month and its first instant
    posts.append(HostPost(tenant="acme", host="a-0", kind="standard",
                          at=START - timedelta(microseconds=1), metrics=("edge.before",)))
    posts.append(HostPost(tenant="acme", host="a-0", kind="standard", at=START,
                          metrics=("edge.first",)))
    posts.append(HostPost(tenant="globex", host="g-big", kind="standard", at=MID + 17 * HOUR / 60,
                          metrics=tuple(f"bulk.m{i}" for i in range(1205))))
    posts.append(ServicePost(tenant="globex", service="web", at=MID + HOUR - timedelta(
        microseconds=1), metrics=("last.instant",)))
    posts.sort(key=lambda p: p.at)
    twice = [p for i, p in enumerate(posts) if i % 17 == 5]  # at-least-once delivery
    everything = posts + twice
    everything.sort(key=lambda p: p.at)
    return Fleet(posts=tuple(everything), plans=plans, hours=HOURS)


# --- the same posts as ingest lines and as redis-cli commands -------------------------------


def _at(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def ingest_line(record: Post | PlanChange) -> str:
    """``record`` as a ``hostmeter ingest`` line (written here, not by the code under test)."""
    if isinstance(record, PlanChange):
        obj: dict[str, Any] = {"type": "plan", "tenant": record.tenant, "plan": record.plan,
                               "at": _at(record.at)}
    elif isinstance(record, HostPost):
        obj = {"type": "host_post", "tenant": record.tenant, "host": record.host,
               "kind": record.kind, "at": _at(record.at), "metrics": list(record.metrics)}
    else:
        obj = {"type": "service_post", "tenant": record.tenant, "service": record.service,
               "at": _at(record.at), "metrics": list(record.metrics)}
    return json.dumps(obj, ensure_ascii=False)


def _quoted(text: str) -> bytes:
    """One argument of a redis-cli command line: in double quotes, every byte that is not plain
    printable ASCII as ``\\xHH`` (redis-cli's own escapes). Lone surrogates ``\\udcHH`` stand
    for the raw byte ``HH`` (``surrogateescape``), so a test can send bytes that are not UTF-8."""
    out = bytearray(b'"')
    for byte in text.encode("utf-8", "surrogateescape"):
        if 0x20 < byte < 0x7F and byte not in b'"\\':
            out.append(byte)
        else:
            out += b"\\x%02x" % byte
    out += b'"'
    return bytes(out)


def protocol_call(post: Post) -> list[str]:
    """The documented protocol (README, record.lua's header), written out by hand."""
    hour = int(post.at.timestamp()) // 3600
    tag = "hm:{" + post.tenant + "}"
    if isinstance(post, HostPost):
        return [f"{tag}:dict:host", f"{tag}:host:{hour}", f"{tag}:posts:{hour}", post.host,
                post.kind, *post.metrics]
    return [f"{tag}:dict:service", f"{tag}:service:{hour}", f"{tag}:posts:{hour}",
            post.service, "service", *post.metrics]


def evalsha_line(keys_and_args: Sequence[str]) -> bytes:
    """``EVALSHA <sha of the shipped record.lua> 3 KEYS… ARGS…`` as one redis-cli input line."""
    sha = script_sha("record").encode()
    return b" ".join([b"EVALSHA", sha, b"3", *map(_quoted, keys_and_args)]) + b"\n"


def cli_commands(posts: Iterable[Post]) -> bytes:
    """One ``EVALSHA`` line per post (:func:`protocol_call`)."""
    return b"".join(evalsha_line(protocol_call(p)) for p in posts)


def redis_cli(port: int, *args: str, cluster: bool = False, input: bytes | None = None
              ) -> list[str]:
    """``redis-cli [-c] -p PORT ARGS``: its non-empty reply lines (an error reply is a line too:
    redis-cli exits 0 for it, and follows it with an empty line), without the ``-> Redirected``
    notes of ``-c``."""
    assert REDIS_CLI is not None
    done = subprocess.run([REDIS_CLI, *(["-c"] if cluster else []), "-p", str(port), *args],
                          input=input, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.decode("utf-8", "replace").splitlines()
            if line and not line.startswith("-> Redirected")]


def load_record_script(ports: Sequence[int]) -> None:
    """``SCRIPT LOAD`` of the shipped file's text on every primary (as a deploy would)."""
    for port in ports:
        [sha] = redis_cli(port, "SCRIPT", "LOAD", script("record"))
        assert sha == script_sha("record")


def record_all(recorder: PostRecorder, posts: Sequence[Post]) -> None:
    """Half the tenants post by single calls (``host_post``/``service_post``/``record``), the
    other half pipelined by ``record_many`` in batches of about 300 (one chunk or more)."""
    batch: list[Post] = []
    for i, post in enumerate(posts):
        if hash_tenant(post.tenant) % 2:
            batch.append(post)
            if len(batch) >= 300:
                assert recorder.record_many(batch).recorded == len(batch)
                batch = []
        elif isinstance(post, HostPost) and i % 3:
            assert recorder.host_post(tenant=post.tenant, host=post.host, kind=post.kind,
                                      at=post.at, metrics=post.metrics) == "recorded"
        elif isinstance(post, ServicePost) and i % 3:
            assert recorder.service_post(tenant=post.tenant, service=post.service, at=post.at,
                                         metrics=post.metrics) == "recorded"
        else:
            assert recorder.record(post) == "recorded"
    if batch:
        assert recorder.record_many(batch).recorded == len(batch)


def hash_tenant(tenant: str) -> int:
    return sum(tenant.encode())


# --- a second database ------------------------------------------------------------------------


@contextmanager
def second_database(request: Any, backend: str, tmp_path: Path) -> Iterator[tuple[Engine, str]]:
    """A second fresh, migrated database on ``backend``, made from the session's migrated
    template as ``db_url`` is (a copied file, ``CREATE DATABASE … TEMPLATE``): quicker than
    migrating an empty one."""
    if backend == "sqlite":
        path = tmp_path / "twin.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        url = f"sqlite:///{path}"
        engine = db.create_engine(url)
        yield engine, url
        engine.dispose()
        return
    template = request.getfixturevalue("_pg_template")
    admin_url = sa.engine.make_url(os.environ["HOSTMETER_TEST_POSTGRES_URL"])
    if admin_url.drivername == "postgresql":
        admin_url = admin_url.set(drivername="postgresql+psycopg")
    name = f"hm_twin_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    url = admin_url.set(database=name).render_as_string(False)
    engine = db.create_engine(url)
    try:
        yield engine, url
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


# --- reading back -----------------------------------------------------------------------------


def _dictionaries(conn: sa.Connection) -> dict[tuple[int, str], dict[int, str]]:
    out: dict[tuple[int, str], dict[int, str]] = {}
    for t, ns, name, ordinal in conn.execute(sa.select(m.metric_names)):
        out.setdefault((t, ns), {})[ordinal] = name
    return out


def _names(blob: bytes, dictionary: dict[int, str]) -> frozenset[str]:
    bits = int.from_bytes(blob, "little")
    missing = [i for i in range(bits.bit_length()) if bits >> i & 1 and i not in dictionary]
    assert not missing, f"bits without a name: {missing[:5]}"
    return frozenset(dictionary[i] for i in range(bits.bit_length()) if bits >> i & 1)


def recorded(engine: Engine) -> dict[str, Any]:
    """The recorded usage by natural keys: host-hours as (kind, metric names), service-hours as
    the (service, metric) keys, tenants, hosts and plans. Ordinals are left out (two databases
    number names in the order they met them); every count is checked against its bitmap."""
    h, t, s = m.host_hours, m.tenants, m.service_hours
    with engine.connect() as conn:
        names = _dictionaries(conn)
        host_rows = {}
        for tenant, host, hour, kind, count, bits, tid in conn.execute(
                sa.select(t.c.key, m.hosts.c.key, h.c.hour, h.c.kind, h.c.metric_count,
                          h.c.metric_bits, h.c.tenant_id)
                .join(m.hosts, m.hosts.c.id == h.c.host_id)
                .join(t, t.c.id == m.hosts.c.tenant_id)):
            metrics = _names(bytes(bits), names.get((tid, "host"), {}))
            assert count == len(metrics), (tenant, host, hour)
            host_rows[(tenant, host, hour)] = (kind, metrics)
        service_rows = {}
        for tenant, hour, count, bits, tid in conn.execute(
                sa.select(t.c.key, s.c.hour, s.c.metric_count, s.c.metric_bits, s.c.tenant_id)
                .join(t, t.c.id == s.c.tenant_id)):
            metrics = _names(bytes(bits), names.get((tid, "service"), {}))
            assert count == len(metrics), (tenant, hour)
            service_rows[(tenant, hour)] = metrics
        hosts = set(conn.execute(sa.select(t.c.key, m.hosts.c.key)
                                 .join(t, t.c.id == m.hosts.c.tenant_id)).all())
        plans = set(conn.execute(sa.select(t.c.key, m.plan_changes.c.at, m.plan_changes.c.plan)
                                 .join(t, t.c.id == m.plan_changes.c.tenant_id)).all())
        tenants = set(conn.execute(sa.select(t.c.key)).scalars())
    return {"host_hours": host_rows, "service_hours": service_rows, "hosts": hosts,
            "plans": plans, "tenants": tenants}


def snapshot(engine: Engine, db_url: str, hours: Sequence[datetime]) -> None:
    """``snapshot-usage`` over ``hours`` as the job runs it (no hot path configured)."""
    ctx = JobContext(engine=engine, settings=Settings(database_url=db_url),
                     clock=lambda: AFTER)
    result = run_job("snapshot-usage", snapshot_usage.run, ctx, AFTER, hours=list(hours))
    assert result.status == "succeeded", result.error


def close_month(engine: Engine) -> None:
    """``close-billing-period`` for February (the hours not snapshotted yet are rebuilt)."""
    out = close_period(engine, BillingRequest(
        period=PERIOD, zone=ZONE, logical_time=AFTER, actor="tests@hotpath", run_id="close-1",
        now=AFTER))
    assert out.status == "succeeded"


def billed(engine: Engine) -> dict[str, Any]:
    """``usage_snapshots`` (and role rows) by tenant key and hour, and every invoice with its
    lines, without ids or when/by-which-run columns."""
    us, t = m.usage_snapshots, m.tenants
    inv, ln = bm.invoices, bm.invoice_lines
    skip = {"id", "tenant_id", "invoice_id", "created_at", "created_by", "run_id",
            "finalized_at", "voided_at"}
    with engine.connect() as conn:
        snaps = sorted(conn.execute(
            sa.select(t.c.key, *(c for c in us.c if c.name != "tenant_id"))
            .join(t, t.c.id == us.c.tenant_id)).all())
        roles = sorted(conn.execute(
            sa.select(t.c.key, m.usage_snapshot_roles.c.hour, m.usage_snapshot_roles.c.role,
                      m.usage_snapshot_roles.c.hosts)
            .join(t, t.c.id == m.usage_snapshot_roles.c.tenant_id)).all())
        invoices = {}
        for row in conn.execute(sa.select(t.c.key, inv).join(t, t.c.id == inv.c.tenant_id)
                                ).mappings():
            lines = [
                {k: v for k, v in line.items() if k not in skip}
                for line in conn.execute(sa.select(ln).where(ln.c.invoice_id == row["id"])
                                         .order_by(ln.c.position)).mappings()]
            invoices[(row["key"], row["revision"])] = (
                {k: v for k, v in row.items() if k not in skip}, lines)
    return {"usage_snapshots": snaps, "usage_snapshot_roles": roles, "invoices": invoices}


def redis_content(nodes: Iterable[Any]) -> dict[bytes, Any]:
    """Every key of the hot path on the given clients (one per primary): hashes as dicts,
    strings as bytes."""
    out: dict[bytes, Any] = {}
    for node in nodes:
        for key in node.scan_iter(match="hm:*", count=1000):
            kind = node.type(key)
            out[key] = node.hgetall(key) if kind == b"hash" else node.get(key)
    return out
