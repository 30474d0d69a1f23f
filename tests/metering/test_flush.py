"""``flush_usage``: Redis → host_hours / service_hours, exactly once, on SQLite and PostgreSQL,
against a real single ``redis-server`` and a real 3-node Redis Cluster (no mocks).

The key test records a generated fleet through :class:`PostRecorder` and flushes it, ingests the
same posts as JSON Lines into a second database, and requires the same recorded usage (by natural
keys and metric *names*), the same hourly snapshots and the same invoices.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hotpathfleet import (
    FIRST,
    MID,
    billed,
    close_month,
    fleet,
    ingest_line,
    record_all,
    recorded,
    redis_content,
    second_database,
    snapshot,
)
from redisservers import RedisServer
from sqlalchemy.engine import Engine

from metering import models as m
from metering.errors import HotPathUnavailable
from metering.flush import flush_usage, held_hours
from metering.hotpath import PostRecorder, connect, hour_keys, pipelined
from metering.ingest import ingest_lines
from metering.records import HostPost, ServicePost
from metering.timeutil import HOUR


@pytest.fixture
def twin(request: pytest.FixtureRequest, backend: str, tmp_path: Path
         ) -> Iterator[tuple[Engine, str]]:
    """A second fresh, migrated database on the same backend as ``engine``."""
    with second_database(request, backend, tmp_path) as pair:
        yield pair


@pytest.fixture
def client(hot_path: tuple[str, bool]) -> Iterator[Any]:
    url, cluster = hot_path
    c = connect(url, cluster=cluster, timeout=5)
    yield c
    c.close()


def primaries(client: Any) -> list[Any]:
    if hasattr(client, "get_primaries"):
        return [client.get_redis_connection(n) for n in client.get_primaries()]
    return [client]


def at(hour: datetime, minute: int = 0) -> datetime:
    return hour + timedelta(minutes=minute)


def post(tenant: str, host: str, when: datetime, *names: str, kind: str = "standard"
         ) -> HostPost:
    return HostPost(tenant=tenant, host=host, kind=kind, at=when, metrics=names)


# --- 1. the same result as ingest --------------------------------------------------------------


def test_flushed_fleet_equals_ingest_down_to_the_invoices(
    engine: Engine, db_url: str, twin: tuple[Engine, str], client: Any
) -> None:
    """The fleet recorded through the helper (single calls and pipelined batches), flushed
    three times while posts go on (the second flush releases the older hours, and late posts
    then reach a released hour again), equals ingesting the same posts: host-hours and
    service-hours by tenant, host, hour, kind and metric names; then the same usage snapshots
    and the same invoices."""
    f = fleet(minutes=30)
    posts = list(f.posts)
    late: list[HostPost | ServicePost] = [
        post("acme", "a-1", at(FIRST, 50), "late.name", "loadavg5"),
        post("globex", "g-1", at(FIRST, 51), "late.other"),
        ServicePost(tenant="initech", service="web", at=at(FIRST, 52), metrics=("late.svc",))]
    recorder = PostRecorder(client)
    first, second = len(posts) * 2 // 5, len(posts) * 4 // 5

    record_all(recorder, posts[:first])
    s1 = flush_usage(engine, client, release_before=None)
    record_all(recorder, posts[first:second])
    s2 = flush_usage(engine, client, release_before=MID)
    record_all(recorder, [*posts[second:], *late])
    s3 = flush_usage(engine, client, release_before=None)
    ingest_lines(engine, [ingest_line(p) for p in f.plans])

    other, other_url = twin
    ingest_lines(other, [*f.lines(), *map(ingest_line, late)])

    assert s1.tenant_hours and s2.released and s3.tenant_hours
    assert s1.skipped == s2.skipped == s3.skipped == 0
    # the counters of the hours kept count every post; the released hours start again at 0
    assert s3.posts == sum(1 for p in posts if p.at >= MID) + len(late)
    mine, theirs = recorded(engine), recorded(other)
    assert mine == theirs
    assert len(mine["host_hours"]) > 100 and len(mine["service_hours"]) > 10
    assert any(kind == "micro" for kind, _ in mine["host_hours"].values())

    for eng, url in ((engine, db_url), (other, other_url)):
        snapshot(eng, url, f.hours)
        close_month(eng)
    mine_billed, theirs_billed = billed(engine), billed(other)
    assert mine_billed == theirs_billed
    items = {line["item"] for _, lines in mine_billed["invoices"].values() for line in lines}
    assert {"standard_hosts", "micro_hosts", "standard_host_metric_overage",
            "micro_host_metric_overage", "minimum_charge"} <= items, items
    assert {tenant for tenant, _ in mine_billed["invoices"]} == {
        "acme", "globex", "initech", "stark", "tiny", "umbrella:東京", "wayne/ent"}


# --- 3. exactly once: twice is once, release, a post between read and release ------------------


def full_dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every metering table, ids and ordinals included."""
    with engine.connect() as conn:
        return {t.name: sorted((tuple(r) for r in conn.execute(sa.select(t))), key=repr)
                for t in (m.tenants, m.hosts, m.metric_names, m.host_hours, m.service_hours)}


H0, H1, H2 = MID - HOUR, MID, MID + HOUR


def three_hours() -> list[HostPost | ServicePost]:
    posts: list[HostPost | ServicePost] = []
    for tenant in ("acme", "globex", "hooli", "wayne/ent"):
        for hour in (H0, H1, H2):
            posts.append(post(tenant, "h-1", at(hour, 3), "cpu", "mem", f"only.{hour.hour}"))
            posts.append(post(tenant, "h-2", at(hour, 9), "cpu", kind="micro"))
            posts.append(ServicePost(tenant=tenant, service="web", at=at(hour, 5),
                                     metrics=("req", f"svc.{hour.hour}")))
    return posts


def test_flushing_twice_is_flushing_once(engine: Engine, client: Any) -> None:
    record_all(PostRecorder(client), three_hours())
    redis_before = redis_content(primaries(client))
    first = flush_usage(engine, client, release_before=None)
    after_first = full_dump(engine)
    assert redis_content(primaries(client)) == redis_before  # nothing released
    assert (first.tenant_hours, first.host_hours, first.service_hours) == (12, 24, 12)
    assert (first.released, first.kept) == (0, 12)

    second = flush_usage(engine, client, release_before=None)
    assert full_dump(engine) == after_first
    assert (second.tenant_hours, second.rows_written) == (12, 0)  # nothing changed
    assert redis_content(primaries(client)) == redis_before

    third = flush_usage(engine, client, release_before=H1)  # releases H0 of every tenant
    assert full_dump(engine) == after_first
    assert (third.released, third.kept) == (4, 8)
    fourth = flush_usage(engine, client, release_before=H1)
    assert full_dump(engine) == after_first
    assert (fourth.tenant_hours, fourth.released, fourth.kept) == (8, 0, 8)


def test_release_deletes_the_older_hours_and_keeps_the_rest_and_the_dictionaries(
    engine: Engine, client: Any
) -> None:
    """``release_before=H1``: H0 goes (its posts counter and both hashes), H1 — the hour at the
    cut-off — and H2 stay; the dictionaries stay, and a later post into the released hour reuses
    their ids and is merged into the rows already in the database."""
    record_all(PostRecorder(client), three_hours())
    dictionaries = {k: v for k, v in redis_content(primaries(client)).items() if b":dict:" in k}
    summary = flush_usage(engine, client, release_before=H1)
    assert (summary.tenant_hours, summary.released, summary.kept) == (12, 4, 8)

    held = held_hours(client)
    assert held == {t: {hour_no(H1), hour_no(H2)} for t in ("acme", "globex", "hooli",
                                                             "wayne/ent")}
    content = redis_content(primaries(client))
    for tenant in ("acme", "globex", "hooli", "wayne/ent"):
        for ns in ("host", "service"):
            _, h0, posts = (k.encode() for k in hour_keys(tenant, ns, hour_no(H0)))
            assert h0 not in content and posts not in content
            for hour in (H1, H2):
                assert hour_keys(tenant, ns, hour_no(hour))[1].encode() in content
    assert {k: v for k, v in content.items() if b":dict:" in k} == dictionaries

    PostRecorder(client).record(post("acme", "h-1", at(H0, 40), "cpu", "late"))
    assert {k: v for k, v in redis_content(primaries(client)).items()
            if b":dict:" in k and b"acme" not in k} == {
        k: v for k, v in dictionaries.items() if b"acme" not in k}
    acme_dict = client.hgetall(hour_keys("acme", "host", 0)[0])
    assert acme_dict[b"cpu"] == dictionaries[hour_keys("acme", "host", 0)[0].encode()][b"cpu"]
    assert acme_dict[b"late"] == str(len(acme_dict) - 1).encode()  # the next dense id
    flush_usage(engine, client, release_before=None)
    rows = recorded(engine)["host_hours"]
    assert rows[("acme", "h-1", H0)] == ("standard", frozenset({"cpu", "mem", "only.8", "late"}))


def hour_no(hour: datetime) -> int:
    return int(hour.timestamp()) // 3600


def test_a_post_between_read_and_release_keeps_the_hour(engine: Engine, client: Any) -> None:
    """A post that reaches an old hour while the flush's transaction commits (after the read,
    before the release) moves the counter: the hour stays in Redis, and the next flush merges the
    post and releases the hour."""
    recorder = PostRecorder(client)
    record_all(recorder, three_hours())
    late = post("globex", "h-1", at(H0, 59), "arrived.during.the.flush")

    def post_now(conn: Any) -> None:
        if not arrived:
            arrived.append(recorder.record(late))

    arrived: list[str] = []
    sa.event.listen(engine, "commit", post_now)
    try:
        summary = flush_usage(engine, client, release_before=H1)
    finally:
        sa.event.remove(engine, "commit", post_now)
    assert arrived == ["recorded"]
    assert (summary.released, summary.kept) == (3, 9)
    assert held_hours(client)["globex"] == {hour_no(H0), hour_no(H1), hour_no(H2)}
    assert "acme" in held_hours(client) and hour_no(H0) not in held_hours(client)["acme"]
    assert recorded(engine)["host_hours"][("globex", "h-1", H0)][1] == {"cpu", "mem", "only.8"}

    again = flush_usage(engine, client, release_before=H1)
    assert (again.tenant_hours, again.released) == (9, 1)
    assert recorded(engine)["host_hours"][("globex", "h-1", H0)][1] == {
        "cpu", "mem", "only.8", "arrived.during.the.flush"}
    assert hour_no(H0) not in held_hours(client)["globex"]


def test_the_release_script_deletes_only_with_the_counter_it_was_given(client: Any) -> None:
    """``read_hour.lua`` then ``release_hour.lua`` by hand: a stale counter deletes nothing."""
    recorder = PostRecorder(client)
    recorder.record(post("acme", "h-1", at(H0, 1), "a"))
    recorder.record(post("acme", "h-1", at(H0, 2), "b"))
    keys = [f"hm:{{acme}}:{kind}:{hour_no(H0)}" for kind in ("posts", "host", "service")]
    [(posts, host_flat, service_flat)] = pipelined(client, "read_hour", [(keys, ())])
    assert (posts, len(host_flat), service_flat) == (b"2", 2, [])
    recorder.record(post("acme", "h-1", at(H0, 3), "a"))  # a repeated post: still a post
    assert pipelined(client, "release_hour", [(keys, (posts,))]) == [0]
    assert client.exists(keys[0], keys[1]) == 2
    assert pipelined(client, "release_hour", [(keys, (b"3",))]) == [1]
    assert client.exists(keys[0], keys[1]) == 0
    assert client.exists(hour_keys("acme", "host", 0)[0]) == 1  # the dictionary stays
    # an hour nobody holds: read as 0 posts, released as "nothing to keep"
    assert pipelined(client, "read_hour", [(keys, ())]) == [[b"0", [], []]]
    assert pipelined(client, "release_hour", [(keys, ("0",))]) == [1]


def test_only_the_hours_asked_for_are_flushed(engine: Engine, client: Any) -> None:
    record_all(PostRecorder(client), three_hours())
    before = redis_content(primaries(client))
    summary = flush_usage(engine, client, release_before=H2 + HOUR, hours=[H1])
    assert (summary.tenant_hours, summary.released) == (4, 4)
    assert {hour for (_, _, hour) in recorded(engine)["host_hours"]} == {H1}
    assert {hour for (_, hour) in recorded(engine)["service_hours"]} == {H1}
    after = redis_content(primaries(client))
    assert {k for k in before if k not in after} == {
        k.encode() for t in ("acme", "globex", "hooli", "wayne/ent")
        for k in (*hour_keys(t, "host", hour_no(H1))[1:], hour_keys(t, "service", hour_no(H1))[1])}


def test_a_flush_with_redis_down_writes_nothing(engine: Engine, redis_single: RedisServer
                                                ) -> None:
    client = connect(redis_single.url, timeout=0.2)
    PostRecorder(client).record(post("acme", "h-1", at(H0, 1), "a"))
    before = full_dump(engine)
    redis_single.stop()
    try:
        with pytest.raises(HotPathUnavailable, match="Redis did not answer"):
            flush_usage(engine, client, release_before=None)
    finally:
        redis_single.start()
        client.close()
    assert full_dump(engine) == before


def test_values_ingest_would_refuse_are_skipped_and_reported(engine: Engine, client: Any
                                                             ) -> None:
    """Only a caller that skipped record.lua's checks can put them there (here: HSET by hand):
    a host that is not UTF-8, a name whose id the dictionary does not know, a name ingest
    refuses; the rest of the tenant-hour is written."""
    recorder = PostRecorder(client)
    recorder.record(post("acme", "h-1", at(H0, 1), "good", "also.good"))
    dict_key, hour_key, _ = hour_keys("acme", "host", hour_no(H0))
    client.hset(hour_key, b"bad-\xff-host", bytes([1, 0, 0, 0, 1, 0x01]))
    client.hset(hour_key, "h-2", bytes([1, 0, 0, 0, 1, 0x01 | 0x10]))  # id 4: never numbered
    client.hset(dict_key, "\u3000", 2)                     # blank to ingest
    client.hset(hour_key, "h-3", bytes([2, 0, 0, 0, 1, 0x05]))
    client.hset(hour_key, "h-4", bytes([1, 0, 0, 0, 9, 0x01]))  # a segment cut short
    summary = flush_usage(engine, client, release_before=None)
    assert summary.skipped == 4
    assert any("h-4" in p and "value" in p for p in summary.problems)
    assert any("bad-" in p for p in summary.problems)
    assert recorded(engine)["host_hours"] == {
        ("acme", "h-1", H0): ("standard", frozenset({"good", "also.good"})),
        ("acme", "h-2", H0): ("standard", frozenset({"good"})),
        ("acme", "h-3", H0): ("micro", frozenset({"good"})),
    }


# --- 7. the cluster: every tenant-hour on every primary ----------------------------------------


def test_the_flush_finds_every_tenant_hour_on_every_primary(
    engine: Engine, redis_cluster_3: Any
) -> None:
    f = fleet(minutes=3)
    client = connect(redis_cluster_3.url, cluster=True, timeout=5)
    try:
        record_all(PostRecorder(client), f.posts)
        expected = {(p.tenant, int(p.at.timestamp()) // 3600) for p in f.posts}
        per_node = []
        for node in primaries(client):
            keys = list(node.scan_iter(match="hm:*:posts:*"))
            per_node.append(len(keys))
        assert all(per_node) and sum(per_node) == len(expected), per_node
        assert {(t, h) for t, hs in held_hours(client).items() for h in hs} == expected
        summary = flush_usage(engine, client, release_before=None)
    finally:
        client.close()
    assert summary.tenant_hours == len(expected)
    assert summary.posts == len(f.posts)
    assert {(t, hour_no(h)) for t, _, h in recorded(engine)["host_hours"]} | {
        (t, hour_no(h)) for t, h in recorded(engine)["service_hours"]} == expected
