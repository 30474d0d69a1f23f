"""The bench's hot-path step at a tiny size: every figure present and plausible, the hour in the
database as posted and gone from Redis, the Redis it picks (the given one, a private one, none)
and the ones it refuses. No timing assertions: figures exist and add up."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from redisservers import RedisCluster, RedisServer, spare_port

from jobs.cli import cli
from jobs.synthetic.bench import tiers as bench
from jobs.synthetic.bench.checks import hot_path_checks
from jobs.synthetic.bench.hotpath import GOALS, HOT_PREFIX, HotPathReport, time_hot_path
from jobs.synthetic.bench.posts import agents
from jobs.synthetic.bench.tiers import BenchTier
from metering import models as m
from metering.hotpath import hour_keys

HOUR = datetime(2026, 10, 31, 16, tzinfo=UTC)

HOT = BenchTier(
    name="hot", tenants=1, hosts=1, ingest_tenants=1, ingest_hosts_per_tenant=1, ingest_hours=1,
    ingest_posts_per_host_hour=1, metrics_per_post=20,
    hot_tenants=4, hot_hosts=30, hot_single_posts=25, hot_direct_posts=12,
)
POSTS = 30 * 60


def _run(engine: sa.Engine, url: str | None, *, cluster: bool = False) -> HotPathReport:
    return time_hot_path(engine, HOT, HOUR, redis_url=url, cluster=cluster)


def _keys(server: RedisServer) -> list[str]:
    return sorted(server.cli("--scan").split())


def _figures(doc: dict[str, Any]) -> dict[str, Any]:
    """Every figure of the step is there and plausible; returns the document."""
    for path in ("direct", "single", "pipelined"):
        rate = doc[path]
        assert rate["posts"] > 0 and rate["seconds"] > 0 and rate["posts_per_s"] > 0, path
    single, piped = doc["single"], doc["pipelined"]
    assert single["posts"] == 25 and piped["posts"] == POSTS - 25
    assert doc["direct"]["posts"] == 12
    for rate in (single, piped):
        assert rate["speedup_vs_direct"] > 0 and rate["floor_posts_per_s"] > 0
        assert rate["ratio_to_floor"] > 0 and isinstance(rate["goal_met"], bool)
    fleet = doc["fleet"]
    assert fleet == {"tenants": 4, "hosts": 30, "posts": POSTS, "names_per_post": 20,
                     "observations": POSTS * 20}
    memory = doc["memory"]
    assert memory["host_hours"] == 30
    # a field of ~13 bytes and a bitmap of the tenant's ids: tens to hundreds of bytes each
    assert 20 < memory["bytes_per_host_hour"] < 2000
    assert memory["bitmap_value_bytes_mean"] > 1 and memory["host_field_bytes_mean"] > 10
    assert memory["dictionaries"]["tenants"] == 4 and memory["dictionaries"]["names"] > 20
    assert memory["dictionaries"]["bytes_per_tenant"] > 0
    assert memory["post_counter_bytes"] > 0
    flush = doc["flush"]
    assert flush["seconds"] > 0 and flush["floor_s"] > 0 and flush["ratio"] > 0
    assert flush["observations"] == POSTS * 20
    assert flush["observations_per_s"] > 0 and flush["host_hours_per_s"] > 0
    assert flush["bits_per_s"] > 0
    summary = flush["summary"]
    assert summary["tenant_hours"] == 4 and summary["host_hours"] == 30
    assert summary["posts"] == POSTS and summary["released"] == 4 and summary["kept"] == 0
    assert set(doc["goals_met"]) == set(GOALS)
    assert doc["step_s"] > 0
    return doc


def test_step_measures_every_path_and_checks_the_flushed_hour(
    bench_engine: sa.Engine, redis_single: RedisServer
) -> None:
    report = _run(bench_engine, redis_single.url)
    assert report.skipped is None and report.error is None and report.timing is not None
    doc = json.loads(json.dumps(report.as_dict()))
    _figures(doc)
    assert doc["redis"]["private"] is False and doc["redis"]["version"]
    assert doc["hour"] == HOUR.isoformat()
    assert [c.name for c in report.checks] == ["hot_path_flushed_as_posted",
                                               "hot_path_hours_released"]
    assert all(c.ok for c in report.checks), report.checks
    posted = report.checks[0].details
    assert posted["host_hours_in_database"] == 30 and posted["posts_flushed"] == POSTS
    # 20 names a post, 18 steady and 2 rotating over 4 positions: 22 distinct names an hour
    assert posted["metrics_in_database"] == 30 * 22
    # the direct path wrote its own tenants' rows into the same hour
    with bench_engine.connect() as conn:
        direct = conn.execute(
            sa.select(sa.func.count()).select_from(
                m.host_hours.join(m.tenants, m.tenants.c.id == m.host_hours.c.tenant_id))
            .where(m.tenants.c.key.like("bench-direct-%"))).scalar_one()
    assert direct == 2  # 12 posts: two hosts posting for ten minutes
    # the Redis was empty: what bench wrote there is gone
    assert _keys(redis_single) == []


def test_correctness_check_fails_on_a_wrong_database_or_a_kept_hour(
    bench_engine: sa.Engine, redis_single: RedisServer
) -> None:
    report = _run(bench_engine, redis_single.url)
    assert all(c.ok for c in report.checks)
    posted = report.checks[0].details
    fleet = agents(tenants=4, hosts=30, metrics_per_post=20, prefix=HOT_PREFIX)
    tenants = sorted({a.tenant for a in fleet})

    def check() -> dict[str, bool]:
        from metering.hotpath import connect

        client = connect(redis_single.url, timeout=5)
        try:
            return {c.name: c.ok for c in hot_path_checks(
                bench_engine, client, tenant_prefix=f"{HOT_PREFIX}-", hour=HOUR,
                tenants=tenants, host_hours=posted["host_hours_posted"],
                host_metrics=posted["metrics_posted"], posts=POSTS, flushed_posts=POSTS)}
        finally:
            client.close()

    assert check() == {"hot_path_flushed_as_posted": True, "hot_path_hours_released": True}
    hh, t = m.host_hours, m.tenants
    with bench_engine.begin() as conn:
        victim = conn.execute(
            sa.select(hh.c.tenant_id, hh.c.host_id).join(t, t.c.id == hh.c.tenant_id)
            .where(t.c.key == tenants[0], hh.c.hour == HOUR).limit(1)).one()
        conn.execute(sa.delete(hh).where(hh.c.tenant_id == victim.tenant_id,
                                         hh.c.host_id == victim.host_id, hh.c.hour == HOUR))
    assert check() == {"hot_path_flushed_as_posted": False, "hot_path_hours_released": True}
    epoch = int(HOUR.timestamp()) // 3600
    redis_single.cli("HSET", hour_keys(tenants[1], "host", epoch)[1], "h", "x")
    assert check() == {"hot_path_flushed_as_posted": False, "hot_path_hours_released": False}


def test_step_starts_and_stops_a_private_redis_without_a_url(bench_engine: sa.Engine) -> None:
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    report = _run(bench_engine, None)
    assert report.timing is not None, report.as_dict()
    doc = _figures(json.loads(json.dumps(report.as_dict())))
    assert doc["redis"]["private"] is True
    assert all(c.ok for c in report.checks)
    port = int(str(doc["redis"]["url"]).rsplit(":", 1)[1].split("/")[0])
    import socket

    with socket.socket() as sock:  # stopped: nothing listens there any more
        sock.settimeout(1)
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_step_is_skipped_without_redis_server_on_path(
    bench_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    report = _run(bench_engine, None)
    assert report.timing is None and report.checks == []
    assert report.skipped is not None and "redis-server is not on PATH" in report.skipped
    assert report.as_dict() == {"skipped": report.skipped}


def test_step_refuses_a_redis_that_holds_keys(
    bench_engine: sa.Engine, redis_single: RedisServer
) -> None:
    redis_single.cli("SET", "someone-else", "1")
    report = _run(bench_engine, redis_single.url)
    assert report.timing is None and report.checks == []
    assert report.skipped is not None
    assert report.skipped.startswith(
        f"refusing to write into Redis at redis://127.0.0.1:{redis_single.port}/0: it holds "
        "1 key(s)")
    assert _keys(redis_single) == ["someone-else"]  # nothing written, nothing deleted
    with bench_engine.connect() as conn:  # not even the direct path ran
        assert conn.execute(sa.select(sa.func.count()).select_from(m.tenants)).scalar() == 0


def test_step_on_a_redis_cluster(bench_engine: sa.Engine,
                                 redis_cluster_3: RedisCluster) -> None:
    report = _run(bench_engine, redis_cluster_3.url, cluster=True)
    assert report.timing is not None, report.as_dict()
    _figures(json.loads(json.dumps(report.as_dict())))
    assert all(c.ok for c in report.checks), report.checks
    assert all(_keys(node) == [] for node in redis_cluster_3.nodes)


# --- the command ---------------------------------------------------------------------------

TINY = BenchTier(
    name="small", tenants=20, hosts=40, hours=6,
    ingest_tenants=1, ingest_hosts_per_tenant=2, ingest_hours=1, ingest_posts_per_host_hour=3,
    metrics_per_post=20, posts_per_call=3, single_posts=2,
    hot_tenants=4, hot_hosts=30, hot_single_posts=25, hot_direct_posts=12,
)


def _invoke(db_url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--database-url", db_url, "bench", "--tier", "small",
                                    "--startup-repeats", "0", *args])


def test_command_runs_the_step_against_the_given_redis(
    db_url: str, redis_single: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(bench.TIERS, "small", TINY)
    result = _invoke(db_url, "--redis-url", redis_single.url)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True
    _figures(doc["hot_path"])
    assert doc["hot_path"]["redis"]["url"] == redis_single.url
    assert doc["checks"]["hot_path_flushed_as_posted"]["ok"] is True
    assert doc["checks"]["hot_path_hours_released"]["ok"] is True
    assert doc["peak_rss_mib"]["hot_path"] is None or doc["peak_rss_mib"]["hot_path"] > 0
    assert _keys(redis_single) == []


def test_command_takes_hostmeter_redis_url(
    db_url: str, redis_single: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(bench.TIERS, "small", TINY)
    monkeypatch.setenv("HOSTMETER_REDIS_URL", redis_single.url)
    redis_single.cli("SET", "someone-else", "1")
    result = _invoke(db_url)
    assert result.exit_code == 0, result.output
    skipped = json.loads(result.stdout)["hot_path"]["skipped"]
    assert skipped.startswith(f"refusing to write into Redis at {redis_single.url}")


def test_command_skips_an_unreachable_redis_and_exits_as_before(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(bench.TIERS, "small", TINY)
    url = f"redis://:secret@127.0.0.1:{spare_port()}/0"  # nothing listens there
    result = _invoke(db_url, "--redis-url", url)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True
    skipped = doc["hot_path"]["skipped"]
    assert skipped.startswith(f"Redis at redis://127.0.0.1:{url.rsplit(':', 1)[1]} did not "
                              "answer")
    assert "secret" not in result.output
    assert not any(name.startswith("hot_path") for name in doc["checks"])


def test_a_tier_without_a_hot_path_skips_the_step(db_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bench.TIERS, "small", dataclasses.replace(TINY, hot_hosts=0))
    result = _invoke(db_url, "--redis-url", "redis://127.0.0.1:1/0")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["hot_path"] == {"skipped": "this tier measures no hot path"}
