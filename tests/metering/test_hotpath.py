"""The post-time hot path — ``record.lua`` and :class:`PostRecorder` — against a real
``redis-server`` and a real 3-node Redis Cluster (no mocks), and the databases (SQLite and
PostgreSQL) the recorded posts end in.

- The protocol is language-neutral: the same posts sent by ``redis-cli`` (the shipped file
  loaded with ``SCRIPT LOAD``, then ``EVALSHA`` with the documented keys and arguments) and by
  the Python helper leave the same bytes in Redis and bill the same.
- A repeated post changes nothing in Redis; the value is the documented layout.
- Bad values are refused: by the helper before anything is sent, by the script (through
  ``redis-cli``) with an error starting ``hostmeter:`` and nothing written.
- Redis down: the helper fails fast (``HotPathUnavailable``) or spools, and flushing what Redis
  took plus ingesting the spool equals ingesting every post.
- On the cluster every key of a tenant lands in one slot, and tenants spread over the nodes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from hotpathfleet import (
    MID,
    billed,
    cli_commands,
    close_month,
    evalsha_line,
    fleet,
    ingest_line,
    load_record_script,
    protocol_call,
    record_all,
    recorded,
    redis_cli,
    redis_content,
    second_database,
    snapshot,
)
from redis.crc import key_slot
from redisservers import RedisCluster, RedisServer, spare_port
from sqlalchemy.engine import Engine

from jobs.cli import cli as hostmeter_cli
from metering import hotpath
from metering import models as m
from metering.errors import HotPathRejected, HotPathUnavailable
from metering.flush import flush_usage
from metering.hotpath import PostRecorder, connect, epoch_hour, hour_keys, script_sha, value_bits
from metering.ingest import ingest_lines
from metering.records import HostPost, ServicePost

H = MID  # an hour of the fleet's month
HOUR_NO = epoch_hour(H)


@dataclass
class Store:
    """One Redis to record into: a single server or the cluster, a client, its primaries'
    ports (for redis-cli)."""

    url: str
    cluster: bool
    ports: list[int]
    client: Any

    def cli(self, *args: str, input: bytes | None = None) -> list[str]:
        return redis_cli(self.ports[0], *args, cluster=self.cluster, input=input)

    def primaries(self) -> list[Any]:
        if not self.cluster:
            return [self.client]
        return [self.client.get_redis_connection(n) for n in self.client.get_primaries()]

    def size(self) -> int:
        return sum(int(redis_cli(p, "DBSIZE")[0]) for p in self.ports)


@pytest.fixture(params=["single", "cluster"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "single":
        server: RedisServer = request.getfixturevalue("redis_single")
        s = Store(server.url, False, [server.port], connect(server.url, timeout=5))
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster_3")
        s = Store(cluster.url, True, [n.port for n in cluster.nodes],
                  connect(cluster.url, cluster=True, timeout=5))
    yield s
    s.client.close()


@pytest.fixture
def twin(request: pytest.FixtureRequest, backend: str, tmp_path: Path
         ) -> Iterator[tuple[Engine, str]]:
    """A second fresh, migrated database on the same backend as ``engine``."""
    with second_database(request, backend, tmp_path) as pair:
        yield pair


def full_dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every metering table, ids and ordinals included."""
    with engine.connect() as conn:
        return {t.name: sorted((tuple(r) for r in conn.execute(sa.select(t))), key=repr)
                for t in (m.tenants, m.hosts, m.metric_names, m.host_hours, m.service_hours,
                          m.plan_changes)}


def post(*names: str, tenant: str = "acme", host: str = "h-1", kind: str = "standard",
         at: datetime = H) -> HostPost:
    return HostPost(tenant=tenant, host=host, kind=kind, at=at, metrics=names)


def evalsha(store: Store, *keys_and_args: str) -> list[str]:
    """One ``EVALSHA`` of record.lua through redis-cli (read from stdin, so any byte goes)."""
    return store.cli(input=evalsha_line(keys_and_args))


# --- the value: repeated posts change nothing, the documented layout ---------------------------


def test_a_repeated_post_changes_nothing_in_redis(store: Store) -> None:
    load_record_script(store.ports)
    keys = hour_keys("acme", "host", HOUR_NO)
    call = protocol_call(post("cpu", "mem", "disk"))
    assert evalsha(store, *call) == ["3"]  # three bits newly set
    value = store.client.hget(keys[1], "h-1")
    dictionary = store.client.hgetall(keys[0])
    memory = int(store.cli("MEMORY", "USAGE", keys[1])[0])

    for again in (call, protocol_call(post("mem", "cpu")), protocol_call(post("disk", "disk"))):
        assert evalsha(store, *again) == ["0"]
        assert store.client.hget(keys[1], "h-1") == value
        assert store.client.hgetall(keys[0]) == dictionary
        assert int(store.cli("MEMORY", "USAGE", keys[1])[0]) == memory
    assert store.client.get(keys[2]) == b"4"  # the posts counter counts every post

    # the helper's repeated post: the same (and record_many's too)
    recorder = PostRecorder(store.client)
    assert recorder.record(post("disk", "cpu")) == "recorded"
    assert recorder.record_many([post("cpu")] * 3).recorded == 3
    assert store.client.hget(keys[1], "h-1") == value
    assert store.client.get(keys[2]) == b"8"

    assert evalsha(store, *protocol_call(post("new"))) == ["1"]  # a new name does change it
    assert store.client.hget(keys[1], "h-1") != value


def test_the_value_is_a_flags_byte_and_segments_of_a_bitmap_of_dense_ids(store: Store) -> None:
    recorder = PostRecorder(store.client)
    names = [f"m{i}" for i in range(10)]
    recorder.record(post(*names[:9]))                          # ids 0..8 in order
    recorder.record(post("m9", "m0", host="h-2", kind="micro"))  # m9 → id 9
    recorder.record(post("m3", host="h-2"))                     # h-2 also standard this hour
    recorder.service_post(tenant="acme", service="web", at=H, metrics=["req", "lat"])
    recorder.service_post(tenant="acme", service="db", at=H, metrics=["lat"])
    dict_host, hour_host, posts = hour_keys("acme", "host", HOUR_NO)
    dict_service, hour_service, _ = hour_keys("acme", "service", HOUR_NO)

    assert {k.decode(): int(v) for k, v in store.client.hgetall(dict_host).items()} == {
        n: i for i, n in enumerate(names)}
    assert {k.decode(): int(v) for k, v in store.client.hgetall(dict_service).items()} == {
        "req": 0, "lat": 1}
    # flags, then segments: 3 bytes of zero bytes skipped, 1 byte of length, the bitmap bytes
    assert store.client.hgetall(hour_host) == {
        b"h-1": bytes([1, 0, 0, 0, 2, 0xFF, 0x01]),      # standard; ids 0..8
        b"h-2": bytes([1 | 2, 0, 0, 0, 2, 0x09, 0x02]),  # standard and micro; ids 0, 3, 9
    }
    assert store.client.hgetall(hour_service) == {b"web": bytes([4, 0, 0, 0, 1, 0x03]),
                                                  b"db": bytes([4, 0, 0, 0, 1, 0x02])}
    assert store.client.get(posts) == b"5"  # host and service posts share the hour's counter


def test_runs_of_zero_bytes_longer_than_a_segment_header_are_skipped(store: Store) -> None:
    """A host with the tenant's first name and its hundredth: two segments, not a bitmap of
    13 bytes; bytes 5 apart stay in one segment (a new header would cost as much)."""
    recorder = PostRecorder(store.client)
    names = [f"a{i:02d}" for i in range(100)]
    recorder.record(post(*names))                                # ids 0..99
    recorder.record(post("a00", "a99", host="far"))              # bytes 0 and 12
    recorder.record(post("a00", "a40", host="near"))             # bytes 0 and 5
    hour_host = hour_keys("acme", "host", HOUR_NO)[1]
    far = store.client.hget(hour_host, "far")
    near = store.client.hget(hour_host, "near")
    assert far == bytes([1, 0, 0, 0, 1, 0x01, 0, 0, 11, 1, 0x08])
    assert near == bytes([1, 0, 0, 0, 6, 0x01, 0, 0, 0, 0, 0x01])
    assert value_bits(far) == 1 | 1 << 99 and value_bits(near) == 1 | 1 << 40
    recorder.record(post("a50", host="far"))                      # byte 6 joins nothing
    far = store.client.hget(hour_host, "far")
    assert far == bytes([1, 0, 0, 0, 1, 0x01, 0, 0, 5, 1, 0x04, 0, 0, 5, 1, 0x08])
    assert value_bits(far) == 1 | 1 << 50 | 1 << 99


# --- 2. language-neutral: redis-cli and the helper, byte for byte and billed -------------------


@pytest.mark.parametrize("cli_target", ["single-db0", "cluster"])
def test_redis_cli_and_the_helper_record_the_same_bytes_and_bill_the_same(
    cli_target: str, request: pytest.FixtureRequest, redis_single: RedisServer,
    engine: Engine, db_url: str, twin: tuple[Engine, str],
) -> None:
    """The fleet through ``redis-cli`` (the shipped file loaded with ``SCRIPT LOAD`` on every
    primary, then one ``EVALSHA`` a line with the documented keys and arguments) into one Redis,
    and through :class:`PostRecorder` into database 1 of the single server: the same keys and
    the same bytes (dictionaries included), then the same recorded usage, snapshots and
    invoices once each is flushed into its own database."""
    f = fleet(minutes=10)
    if cli_target == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster_3")
        ports, cli_url, is_cluster = [n.port for n in cluster.nodes], cluster.url, True
    else:
        ports, cli_url, is_cluster = [redis_single.port], redis_single.url, False
    load_record_script(ports)
    replies = redis_cli(ports[0], cluster=is_cluster, input=cli_commands(f.posts))
    assert len(replies) == len(f.posts) and all(r.isdigit() for r in replies), replies[:5]

    python_url = f"redis://127.0.0.1:{redis_single.port}/1"
    python_client = connect(python_url, timeout=5)
    cli_client = connect(cli_url, cluster=is_cluster, timeout=5)
    try:
        record_all(PostRecorder(python_client), f.posts)
        cli_nodes = ([cli_client.get_redis_connection(n) for n in cli_client.get_primaries()]
                     if is_cluster else [cli_client])
        by_cli, by_python = redis_content(cli_nodes), redis_content([python_client])
        assert by_cli == by_python
        assert len(by_cli) > 50

        flush_usage(engine, cli_client, release_before=None)
        other, other_url = twin
        flush_usage(other, python_client, release_before=None)
    finally:
        python_client.close()
        cli_client.close()
    for eng in (engine, other):
        ingest_lines(eng, [ingest_line(p) for p in f.plans])
    assert recorded(engine) == recorded(other)
    for eng, url in ((engine, db_url), (other, other_url)):
        snapshot(eng, url, f.hours)
        close_month(eng)
    assert billed(engine) == billed(other)
    assert billed(engine)["invoices"]


def test_a_post_of_33000_names_equals_ingest(store: Store, engine: Engine,
                                             twin: tuple[Engine, str]) -> None:
    """More names than one HMGET chunk (1,000) and a bitmap longer than one byte chunk (4,000
    bytes) of the script, posted in two overlapping halves, then a repeat."""
    names = [f"n.{i:05d}" for i in range(33_000)]
    posts = [post(*names[:20_000]), post(*names[15_000:]), post(*names[::7])]
    recorder = PostRecorder(store.client)
    for p in posts:
        recorder.record(p)
    value = store.client.hget(hour_keys("acme", "host", HOUR_NO)[1], "h-1")
    assert value_bits(value) == (1 << 33_000) - 1  # every id, none else
    assert len(value) == 1 + (33_000 // 8 // 255 + 1) * 4 + 33_000 // 8  # full segments
    flush_usage(engine, store.client, release_before=None)
    other, _ = twin
    ingest_lines(other, [ingest_line(p) for p in posts])
    mine = recorded(engine)
    assert mine == recorded(other)
    [(kind, got)] = mine["host_hours"].values()
    assert (kind, got) == ("standard", frozenset(names))


# --- 5. rejections -----------------------------------------------------------------------------

LONG_501 = "x" * 501
EURO_501 = "€" * 167  # 501 bytes in UTF-8, 167 characters
E_500 = "é" * 250  # 500 bytes: accepted

REJECTED: list[Any] = [
    pytest.param(post("a", tenant="a{b"), id="tenant-with-open-brace"),
    pytest.param(post("a", tenant="a}b"), id="tenant-with-close-brace"),
    pytest.param(post("a", tenant="{acme}"), id="tenant-that-is-a-hash-tag"),
    pytest.param(post("a", tenant=""), id="empty-tenant"),
    pytest.param(post("a", tenant="   "), id="blank-tenant"),
    pytest.param(post("a", tenant="a\0b"), id="tenant-with-nul"),
    pytest.param(post("a", tenant="t" * 201), id="tenant-over-200-bytes"),
    pytest.param(post("a", host=""), id="empty-host"),
    pytest.param(post("a", host=" \t"), id="blank-host"),
    pytest.param(post("a", host="h\0"), id="host-with-nul"),
    pytest.param(post("a", host="h" * 256), id="host-over-255-bytes"),
    pytest.param(post("a", kind="large"), id="kind-large"),
    pytest.param(post("a", kind="service"), id="kind-service-for-a-host"),
    pytest.param(post("a", kind=""), id="kind-empty"),
    pytest.param(post(), id="no-names"),
    pytest.param(post("ok", ""), id="empty-name"),
    pytest.param(post("ok", "   "), id="blank-name"),
    pytest.param(post("ok", "\u3000"), id="ideographic-space-name"),
    pytest.param(post("ok", "a\0b"), id="name-with-nul"),
    pytest.param(post("ok", LONG_501), id="name-over-500-bytes"),
    pytest.param(post("ok", EURO_501), id="name-of-167-chars-and-501-bytes"),
    pytest.param(post("ok", at=datetime(2026, 2, 10, 9)), id="naive-instant"),
    pytest.param(post("ok", at=datetime(1969, 12, 31, 23, 59, tzinfo=UTC)),
                 id="instant-before-1970"),  # record.lua would refuse hour -1 after the send
    pytest.param(post("ok", at=datetime(9999, 1, 1, tzinfo=UTC)), id="instant-in-9999"),
    pytest.param(ServicePost(tenant="acme", service="", at=H, metrics=("a",)),
                 id="empty-service"),
    pytest.param(ServicePost(tenant="acme", service="s" * 256, at=H, metrics=("a",)),
                 id="service-over-255-bytes"),
    pytest.param(ServicePost(tenant="acme", service="web", at=H, metrics=("a", "\0")),
                 id="service-name-with-nul"),
]


@pytest.mark.parametrize("bad", REJECTED)
def test_the_helper_rejects_before_anything_is_sent(bad: Any, redis_single: RedisServer) -> None:
    """Every way in refuses the post with ``HotPathRejected``; against a live server nothing is
    written, and against a port nobody listens on it is still a rejection (not
    ``HotPathUnavailable``): the values were checked before any connection was made."""
    good = post("fine")
    nowhere = PostRecorder(connect(f"redis://127.0.0.1:{spare_port()}/0", timeout=0.2))
    live = PostRecorder(connect(redis_single.url, timeout=5))
    try:
        for recorder in (nowhere, live):
            with pytest.raises(HotPathRejected):
                recorder.record(bad)
            with pytest.raises(HotPathRejected):
                recorder.record_many([good, bad])  # the good one is not sent either
            with pytest.raises(HotPathRejected):
                if isinstance(bad, HostPost):
                    recorder.host_post(tenant=bad.tenant, host=bad.host, kind=bad.kind,
                                       at=bad.at, metrics=bad.metrics)
                else:
                    recorder.service_post(tenant=bad.tenant, service=bad.service, at=bad.at,
                                          metrics=bad.metrics)
        assert redis_single.cli("DBSIZE").strip() == "0"
        assert live.record(post("a", "b", tenant="t" * 200, host="é" * 127, kind="micro",
                                at=H)) == "recorded"  # the limits themselves are fine
        assert live.record(post(E_500, "a" * 500)) == "recorded"
    finally:
        nowhere.close()
        live.close()


SCRIPT_REFUSES = [  # (keys and arguments of one EVALSHA … 3, what the error names)
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{globex}:posts:5", "h", "standard",
                  "a"], "KEYS[3]", id="posts-key-of-another-tenant"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:6", "h", "standard",
                  "a"], "KEYS[3]", id="posts-key-of-another-hour"),
    pytest.param(["hm:{acme}:dict:host", "hm:{globex}:host:5", "hm:{acme}:posts:5", "h",
                  "standard", "a"], "KEYS[2]", id="hour-key-of-another-tenant"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:service:5", "hm:{acme}:posts:5", "h",
                  "standard", "a"], "KEYS[2]", id="service-hour-with-the-host-dictionary"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:-5", "hm:{acme}:posts:-5", "h",
                  "standard", "a"], "KEYS[2]", id="negative-hour"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:x5", "hm:{acme}:posts:x5", "h",
                  "standard", "a"], "KEYS[2]", id="hour-not-a-number"),
    pytest.param(["hm:{acme}:dict:metric", "hm:{acme}:metric:5", "hm:{acme}:posts:5", "h",
                  "standard", "a"], "KEYS[1]", id="unknown-namespace"),
    pytest.param(["hm:acme:dict:host", "hm:acme:host:5", "hm:acme:posts:5", "h", "standard",
                  "a"], "KEYS[1]", id="no-hash-tag"),
    pytest.param(["xx:{acme}:dict:host", "xx:{acme}:host:5", "xx:{acme}:posts:5", "h",
                  "standard", "a"], "KEYS[1]", id="other-prefix"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h", "large",
                  "a"], "ARGV[2]", id="kind-large"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h", "service",
                  "a"], "ARGV[2]", id="service-kind-on-host-keys"),
    pytest.param(["hm:{acme}:dict:service", "hm:{acme}:service:5", "hm:{acme}:posts:5", "web",
                  "standard", "a"], "ARGV[2]", id="host-kind-on-service-keys"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h",
                  "standard"], "at least one metric name", id="no-names"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "", "standard",
                  "a"], "ARGV[1]", id="empty-host"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", " \t ",
                  "standard", "a"], "ARGV[1]", id="blank-host"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h" * 256,
                  "standard", "a"], "ARGV[1]", id="host-over-255-bytes"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h\0",
                  "standard", "a"], "ARGV[1]", id="host-with-nul"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h", "standard",
                  "ok", ""], "metric name 2", id="empty-name"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h", "standard",
                  "ok", " \n\r\t\f\v"], "metric name 2", id="blank-name"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h", "standard",
                  "ok", "new", "a\0b"], "metric name 3", id="name-with-nul"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h", "standard",
                  "new", LONG_501], "metric name 2", id="name-over-500-bytes"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h", "standard",
                  EURO_501], "metric name 1", id="name-of-167-chars-and-501-bytes"),
    # what Python's str.strip() and UTF-8 decoding refuse in ingest, refused here too
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h", "standard",
                  "ok", "\u3000\u00a0\u2009"], "metric name 2", id="name-of-unicode-spaces"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h", "standard",
                  "\x1c\x1f"], "metric name 1", id="name-of-separators"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h", "standard",
                  "cpu\udcff"], "metric name 1", id="name-not-utf8"),  # argv byte 0xff
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h", "standard",
                  "\udced\udca0\udc80"], "metric name 1", id="name-utf8-surrogate"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "\u3000",
                  "standard", "a"], "ARGV[1]", id="host-of-an-ideographic-space"),
    pytest.param(["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5", "h\udcc0\udcaf",
                  "standard", "a"], "ARGV[1]", id="host-overlong-utf8"),
    pytest.param([f"hm:{{{'t' * 201}}}:dict:host", f"hm:{{{'t' * 201}}}:host:5",
                  f"hm:{{{'t' * 201}}}:posts:5", "h", "standard", "a"], "tenant",
                 id="tenant-over-200-bytes"),
    pytest.param(["hm:{\u3000}:dict:host", "hm:{\u3000}:host:5", "hm:{\u3000}:posts:5", "h",
                  "standard", "a"], "tenant", id="blank-tenant"),
]


@pytest.mark.parametrize(("call", "names"), SCRIPT_REFUSES)
def test_the_script_refuses_bad_keys_and_arguments_and_writes_nothing(
    store: Store, call: list[str], names: str
) -> None:
    """Through redis-cli, as a caller in any language sends them; each after a good post of the
    same tenant and hour, whose keys must not move (no new dictionary id for a good name that
    came before the bad one, no counter increment)."""
    load_record_script(store.ports)
    assert evalsha(store, *protocol_call(HostPost(
        tenant="acme", host="h", kind="standard", at=datetime.fromtimestamp(5 * 3600, UTC),
        metrics=("ok",)))) == ["1"]
    before = redis_content(store.primaries())

    [reply] = evalsha(store, *call)
    if store.cluster and len({key_slot(k.encode()) for k in call[:3]}) > 1:
        assert reply.startswith("CROSSSLOT"), reply  # the cluster refuses it before the script
    else:
        assert reply.startswith("hostmeter:"), reply
        assert names in reply, reply
    assert redis_content(store.primaries()) == before


def test_the_script_needs_exactly_three_keys(store: Store) -> None:
    load_record_script(store.ports)
    sha = script_sha("record")
    for numkeys, keys in (("2", ["hm:{acme}:dict:host", "hm:{acme}:host:5"]),
                          ("4", ["hm:{acme}:dict:host", "hm:{acme}:host:5", "hm:{acme}:posts:5",
                                 "hm:{acme}:x"])):
        [reply] = store.cli("EVALSHA", sha, numkeys, *keys, "h", "standard", "a")
        assert reply.startswith("hostmeter:") and "3 keys" in reply, reply
    assert store.size() == 0


# --- 4. Redis down: fail fast, or spool; nothing is lost --------------------------------------


def _ingest_file(db_url: str, path: Path) -> dict[str, Any]:
    """``hostmeter ingest FILE --format json`` (in-process, through click)."""
    result = CliRunner().invoke(hostmeter_cli, ["ingest", str(path), "--format", "json"],
                                env={"HOSTMETER_DATABASE_URL": db_url})
    assert result.exit_code == 0, result.output
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def test_redis_down_fails_fast_or_spools_and_nothing_is_lost(
    redis_single: RedisServer, engine: Engine, db_url: str, twin: tuple[Engine, str],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Posts go on while the server is stopped mid-run and started again: without a spool each
    call raises ``HotPathUnavailable`` within the timeout; with one, single calls return
    ``"spooled"`` and ``record_many`` spools the chunks Redis did not confirm. Flushing what
    Redis took and ingesting the spool (``hostmeter ingest``) gives what ingesting every post
    directly gives; ingesting the spool again changes nothing.

    The stopped server keeps nothing (no persistence, as a cache node that is replaced), so a
    flush runs just before it stops, as the 5-minute flush would have: what a dead server held
    and no flush had moved is lost — the spool holds only what Redis did not take."""
    f = fleet(minutes=12)
    posts = list(f.posts)
    spool = tmp_path / "spool.jsonl"
    strict = PostRecorder.from_url(redis_single.url, timeout=0.2)
    spooling = PostRecorder.from_url(redis_single.url, timeout=0.2, spool=spool)
    a, b, c = len(posts) // 4, len(posts) // 2, len(posts) * 3 // 4
    spooled: list[HostPost | ServicePost] = []
    try:
        record_all(spooling, posts[:a])

        # record_many: Redis stops after its second chunk was confirmed
        monkeypatch.setattr(hotpath, "PIPELINE_CHUNK", 40)
        real = hotpath.pipelined
        sent: list[Any] = []

        def stop_after_two_chunks(*args: Any) -> Any:
            if len(sent) == 2:
                flush_usage(engine, args[0], release_before=None)
                redis_single.stop()
            sent.append(args)
            return real(*args)

        monkeypatch.setattr(hotpath, "pipelined", stop_after_two_chunks)
        batch = posts[a:b]
        result = spooling.record_many(batch)
        assert (result.recorded, result.spooled) == (80, len(batch) - 80)
        spooled += batch[80:]
        monkeypatch.setattr(hotpath, "pipelined", real)
        assert redis_single.process is None

        for p in posts[b:c]:  # Redis is down
            started = time.monotonic()
            with pytest.raises(HotPathUnavailable):
                strict.record(p)
            assert time.monotonic() - started < 2
            started = time.monotonic()
            assert spooling.record(p) == "spooled"
            assert time.monotonic() - started < 2
            spooled.append(p)
        started = time.monotonic()
        with pytest.raises(HotPathUnavailable):
            strict.record_many(posts[b:c])
        assert time.monotonic() - started < 2
    finally:
        if redis_single.process is None:
            redis_single.start()
    record_all(spooling, posts[c:])  # back: recorded again
    strict.close()
    spooling.close()

    lines = spool.read_text("utf-8").splitlines()
    assert len(lines) == len(spooled)
    assert [json.loads(x) for x in lines] == [json.loads(ingest_line(p)) for p in spooled]

    client = connect(redis_single.url, timeout=5)
    try:
        flush_usage(engine, client, release_before=None)
    finally:
        client.close()
    ingest_lines(engine, [ingest_line(p) for p in f.plans])
    assert _ingest_file(db_url, spool)["records"] == len(spooled)
    other, _ = twin
    ingest_lines(other, f.lines())
    assert recorded(engine) == recorded(other)

    before = full_dump(engine)
    _ingest_file(db_url, spool)
    assert full_dump(engine) == before


def test_a_hanging_redis_is_given_up_after_the_timeout(
    redis_single: RedisServer, engine: Engine, twin: tuple[Engine, str], tmp_path: Path
) -> None:
    """A server that accepts the connection but does not answer (clients paused): each call
    gives up after the timeout, not the TCP one. The post Redis may still run later and the one
    in the spool count once."""
    spool = tmp_path / "spool.jsonl"
    recorder = PostRecorder.from_url(redis_single.url, timeout=0.2, spool=spool)
    strict = PostRecorder.from_url(redis_single.url, timeout=0.2)
    p1, p2 = post("a", "b"), post("b", "c", host="h-2")
    try:
        assert recorder.record(p1) == "recorded"  # the pool holds a connection now
        redis_single.cli("CLIENT", "PAUSE", "1500", "WRITE")
        started = time.monotonic()
        assert recorder.record(p2) == "spooled"
        assert recorder.record_many([p1, p2]).spooled == 2
        with pytest.raises(HotPathUnavailable):
            strict.record(p2)
        assert time.monotonic() - started < 1.4  # three calls, each cut at 0.2 s
    finally:
        redis_single.cli("CLIENT", "UNPAUSE")
        recorder.close()
        strict.close()
    client = connect(redis_single.url, timeout=5)
    try:
        flush_usage(engine, client, release_before=None)
    finally:
        client.close()
    ingest_lines(engine, spool.read_text("utf-8").splitlines())
    other, _ = twin
    ingest_lines(other, [ingest_line(p1), ingest_line(p2)])
    assert recorded(engine) == recorded(other)


def test_connect_to_nothing_is_unavailable(tmp_path: Path) -> None:
    """Nobody listening: a single-server client fails on its first call, a cluster client
    (which reads the slot map when it is made) at once — both as ``HotPathUnavailable``."""
    url = f"redis://:secret@127.0.0.1:{spare_port()}/0"
    started = time.monotonic()
    with pytest.raises(HotPathUnavailable) as info:
        connect(url, cluster=True, timeout=0.2)
    assert "secret" not in str(info.value)
    with pytest.raises(HotPathUnavailable) as info:
        PostRecorder.from_url(url, cluster=True, timeout=0.2)
    recorder = PostRecorder.from_url(url, timeout=0.2)
    with pytest.raises(HotPathUnavailable):
        recorder.record(post("a"))
    spooled = PostRecorder.from_url(url, timeout=0.2, spool=tmp_path / "s.jsonl")
    assert spooled.record(post("a")) == "spooled"
    assert time.monotonic() - started < 3


# --- 7. the cluster: one slot per tenant, tenants on every node ---------------------------------


def test_a_tenants_keys_share_one_slot_and_tenants_spread_over_the_nodes(
    redis_cluster_3: RedisCluster,
) -> None:
    f = fleet(minutes=2)
    client = connect(redis_cluster_3.url, cluster=True, timeout=5)
    try:
        record_all(PostRecorder(client), f.posts)
        owner: dict[str, int] = {}
        for node in redis_cluster_3.nodes:
            for key in redis_cli(node.port, "--scan", "--pattern", "hm:*"):
                tenant = key[key.index("{") + 1:key.index("}")]
                assert owner.setdefault(tenant, node.port) == node.port, (tenant, key)
    finally:
        client.close()
    assert set(owner) == set(f.tenants)
    assert len(set(owner.values())) == 3  # every node holds tenants
    node = redis_cluster_3.nodes[0]
    for tenant in f.tenants:
        keys = [*hour_keys(tenant, "host", HOUR_NO), *hour_keys(tenant, "service", HOUR_NO)]
        slots = {redis_cli(node.port, "CLUSTER", "KEYSLOT", k)[0] for k in keys}
        assert slots == {str(key_slot(tenant.encode()))}, tenant


def _cluster_ok(cluster: RedisCluster) -> None:
    deadline = time.monotonic() + 30
    while not all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in cluster.nodes):
        assert time.monotonic() < deadline, "the cluster did not come back"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_cluster_node_down_spools_only_the_posts_of_its_tenants(
    redis_cluster_3: RedisCluster, engine: Engine, twin: tuple[Engine, str], tmp_path: Path
) -> None:
    """One primary stops: posts of the tenants it holds are spooled, the others recorded; a
    flush fails as a whole (it cannot see every tenant-hour) and writes nothing. Once the node
    is back (empty: what it held had been flushed), flushing and ingesting the spool equal
    ingesting every post."""
    f = fleet(minutes=4)
    posts = list(f.posts)
    half = len(posts) // 2
    spool = tmp_path / "spool.jsonl"
    recorder = PostRecorder.from_url(redis_cluster_3.url, cluster=True, timeout=0.2,
                                     spool=spool)
    client = connect(redis_cluster_3.url, cluster=True, timeout=0.2)
    record_all(recorder, posts[:half])
    flush_usage(engine, client, release_before=None)
    [down] = [n for n in redis_cluster_3.nodes
              if redis_cli(n.port, "EXISTS", "hm:{stark}:dict:host") == ["1"]]
    on_down = {t for t in f.tenants
               if redis_cli(down.port, "EXISTS", hour_keys(t, "host", 0)[0]) == ["1"]
               or redis_cli(down.port, "EXISTS", hour_keys(t, "service", 0)[0]) == ["1"]}
    before = full_dump(engine)
    down.stop()
    try:
        outcomes = {(p.tenant, recorder.record(p)) for p in posts[half:]}
        assert {t for t, how in outcomes if how == "spooled"} == on_down
        assert {t for t, how in outcomes if how == "recorded"} == set(f.tenants) - on_down
        with pytest.raises(HotPathUnavailable):
            flush_usage(engine, client, release_before=None)
        assert full_dump(engine) == before
    finally:
        down.start()
        _cluster_ok(redis_cluster_3)
    recorder.close()
    client.close()
    client = connect(redis_cluster_3.url, cluster=True, timeout=5)
    try:
        flush_usage(engine, client, release_before=None)
    finally:
        client.close()
    ingest_lines(engine, spool.read_text("utf-8").splitlines())
    other, _ = twin
    ingest_lines(other, [ingest_line(p) for p in posts])
    assert recorded(engine) == recorded(other)
