"""The post-time hot path (:mod:`metering.hotpath`, :mod:`metering.flush`), measured side by side
in one run, from one Python process to one Redis, each figure beside its baseline or floor and
its goal:

- **direct**: today's path, :meth:`metering.ingest.UsageRecorder.post_host_metrics` (one
  transaction per post) into the tier's database: ``hot_direct_posts`` posts of
  ``metrics_per_post`` names (hosts posting a minute each for ten minutes). The baseline.
- **recording a realistic hour**: ``hot_hosts`` hosts (over ``hot_tenants`` skewed tenants,
  :func:`jobs.synthetic.bench.posts.agents`' names: 90 % of a post the same every minute) each
  post once a minute for an hour. All but the hour's last ``hot_single_posts`` posts go through
  :meth:`~metering.hotpath.PostRecorder.record_many` (**pipelined**, 1,000 posts per round
  trip); the last ones through :meth:`~metering.hotpath.PostRecorder.host_post` (**single**: one
  call, one round trip each), as an API server records a post it has just received. Building
  the :class:`~metering.records.HostPost` objects a pipelined call takes is not timed (an API
  server has them); ``host_post`` is timed from its keyword arguments.
- **floor** of both: the least any recording must do, a plain ``HMGET`` of the post's names on
  the tenant's Redis dictionary (the names sent, each looked up), the same posts one call each
  and pipelined 1,000 a round trip, through the same client.
- **memory**: ``MEMORY USAGE … SAMPLES 0`` of the hour hashes (``hm:{T}:host:H``) over the
  host-hours they hold, and, apart, the per-tenant dictionaries and post counters.
- **flush**: :func:`metering.flush.flush_usage` of the hour into the tier's database, released
  from Redis in the same call (``release_before`` after the hour); observations per second are
  the metric names the flushed posts carried (posts × names, the unit of the ingest figures),
  also host-hours and distinct bits per second. It is the fleet's first hour in the database:
  the flush creates the tenants, hosts and dictionaries too (a later hour only merges). Its
  floor: the hour's hashes read back with one pipelined ``HGETALL`` each, and as many rows
  (tenant, host, hour, kind, count, bitmap) written into a temporary table with one
  ``executemany``.

Then it checks (:func:`jobs.synthetic.bench.checks.hot_path_checks`) that the database holds the
hour exactly as posted and Redis no longer holds it.

Which Redis: ``redis_url`` (``hostmeter bench --redis-url``, by default
``HOSTMETER_REDIS_URL``); without one, a private ``redis-server`` on a spare loopback port in a
temporary directory (no persistence), stopped afterwards. No ``redis-server`` on ``PATH``, a
Redis that does not answer, or a Redis that holds any key: the step is **skipped** with the
reason (the hot path's keys are fixed, ``hm:{tenant}:…``, so bench never writes into a Redis it
did not find empty); in a Redis it found empty it deletes every key it wrote.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from jobs.synthetic.bench.checks import Check, hot_path_checks
from jobs.synthetic.bench.posts import Agent, agents, posted_names
from jobs.synthetic.bench.tiers import BenchTier, Progress, no_progress
from metering.db import UTCDateTime
from metering.hotpath import (
    PIPELINE_CHUNK,
    PostRecorder,
    connect,
    hour_keys,
    shown_url,
    value_bits,
)
from metering.ingest import UsageRecorder
from metering.records import HostPost
from metering.timeutil import HOUR

__all__ = ["GOALS", "HOT_PREFIX", "HotPathReport", "HotPathTiming", "bench_redis",
           "time_hot_path"]

HOT_PREFIX = "bench-hot"
"""Tenants ``bench-hot-t<n>`` and hosts ``bench-hot-h<n>`` post through Redis."""
DIRECT_PREFIX = "bench-direct"
"""Tenants and hosts of the direct path's posts."""
DIRECT_MINUTES = 10
"""Minutes each host of the direct sample posts: its first post opens a host-hour row, the
others merge into it."""
RECORD_TIMEOUT = 5.0
"""Seconds the bench's recorder waits for one Redis reply (a pipeline of 1,000 posts takes
about 0.1 s of Redis time; the post path's default of 0.25 s leaves little room on a busy
machine, and a timed-out bench measures nothing)."""
GENERATE_CHUNK = 10_000
"""Posts built (untimed) and then recorded (timed) at a time: an hour of 100,000 hosts is
never in memory at once."""
FLOOR_POSTS = 20_000
"""Posts in the pipelined floor (the hour's first ones)."""
GOALS = {
    "single_posts_per_s": 5_000,
    "single_speedup_vs_direct": 25,
    "pipelined_posts_per_s": 50_000,
    "flush_observations_per_s": 1_000_000,
    "bytes_per_host_hour": 200,
}
"""The issue's goals: at least (rates) or at most (bytes) these."""


class _Skipped(Exception):
    """The step cannot run here; the message says why."""


# --- which Redis ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Target:
    url: str
    cluster: bool
    private: bool


def _spare_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@contextmanager
def _private_redis() -> Iterator[str]:
    """A ``redis-server`` of the bench's own: a spare loopback port, a temporary directory,
    nothing saved; stopped (and its directory removed) on exit."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise _Skipped("no Redis: neither --redis-url nor HOSTMETER_REDIS_URL is set, and "
                       "redis-server is not on PATH to start a private one")
    with tempfile.TemporaryDirectory(prefix="hostmeter-bench-redis-") as tmp:
        process = None
        for _attempt in range(3):  # the spare port may be taken before redis-server binds it
            port = _spare_port()
            url = f"redis://127.0.0.1:{port}/0"
            process = subprocess.Popen(
                [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", tmp, "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while process.poll() is None and time.monotonic() < deadline:
                if _answers(url):
                    break
                time.sleep(0.05)
            else:
                if process.poll() is None:
                    _stop(process)
                process = None
                continue
            break
        if process is None:
            raise _Skipped(f"the private redis-server ({exe}) did not start")
        try:
            yield url
        finally:
            _stop(process)


@contextmanager
def bench_redis(url: str | None, *, cluster: bool = False) -> Iterator[_Target]:
    """The Redis the step runs against: ``url``, or a private ``redis-server``. Raises
    :class:`_Skipped` (with the reason) when there is none, it does not answer, or it is not
    empty; on exit deletes the keys the step left in a Redis that was not its own."""
    if url is None:
        with _private_redis() as private_url:
            yield _Target(url=private_url, cluster=False, private=True)
        return
    client = _client(url, cluster=cluster, timeout=2.0)
    try:
        keys = int(client.dbsize())
    except Exception as exc:
        raise _Skipped(f"Redis at {shown_url(url)} did not answer: {exc}") from None
    finally:
        client.close()
    if keys:
        raise _Skipped(
            f"refusing to write into Redis at {shown_url(url)}: it holds {keys} key(s), and "
            "the hot path's keys are fixed (hm:{tenant}:…); point --redis-url at an empty "
            "Redis, or unset it to let bench start a private redis-server")
    try:
        yield _Target(url=url, cluster=cluster, private=False)
    finally:
        _delete_bench_keys(url, cluster)


def _client(url: str, *, cluster: bool, timeout: float) -> Any:
    from metering.errors import MeteringError

    try:
        return connect(url, cluster=cluster, timeout=timeout)
    except MeteringError as exc:  # a bad URL, or a cluster that does not answer
        raise _Skipped(str(exc)) from None


def _delete_bench_keys(url: str, cluster: bool) -> int:
    """Delete every ``hm:{bench-…}`` key (the Redis was empty when the step began)."""
    client = connect(url, cluster=cluster, timeout=10.0)
    deleted = 0
    try:
        keys = list(client.scan_iter(match="hm:{bench-*", count=1000))
        for first in range(0, len(keys), 1000):
            with client.pipeline(transaction=False) as pipe:
                for key in keys[first:first + 1000]:
                    pipe.unlink(key)
                deleted += sum(int(n) for n in pipe.execute())
    finally:
        client.close()
    return deleted


# --- figures ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Rate:
    """Posts sent through one path and the time they took."""

    posts: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.posts / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"posts": self.posts, "seconds": round(self.seconds, 3),
                "posts_per_s": round(self.per_s, 1)}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


@dataclass(frozen=True, slots=True, kw_only=True)
class HotPathTiming:
    """Everything the step measured."""

    redis_url: str
    private: bool
    redis_version: str
    hiredis: bool
    hour: datetime
    tenants: int
    hosts: int
    names_per_post: int
    direct: Rate
    pipelined: Rate
    single: Rate
    pipelined_floor: Rate
    single_floor: Rate
    server_us_pipelined: float | None
    server_us_single: float | None
    memory: dict[str, Any]
    flush_s: float
    flush: dict[str, Any]
    flush_floor_read_s: float
    flush_floor_write_s: float
    observations: int
    step_s: float

    @property
    def posts(self) -> int:
        return self.pipelined.posts + self.single.posts

    def goals_met(self) -> dict[str, bool]:
        g = GOALS
        flush_rate = self.observations / self.flush_s if self.flush_s else 0.0
        return {
            "single_posts_per_s": self.single.per_s >= g["single_posts_per_s"],
            "single_speedup_vs_direct": (self.direct.per_s > 0 and self.single.per_s
                                         >= g["single_speedup_vs_direct"] * self.direct.per_s),
            "pipelined_posts_per_s": self.pipelined.per_s >= g["pipelined_posts_per_s"],
            "flush_observations_per_s": flush_rate >= g["flush_observations_per_s"],
            "bytes_per_host_hour": (self.memory["bytes_per_host_hour"] is not None and
                                    self.memory["bytes_per_host_hour"]
                                    <= g["bytes_per_host_hour"]),
        }

    def as_dict(self) -> dict[str, Any]:
        met = self.goals_met()
        direct, single, piped = self.direct, self.single, self.pipelined
        flush_floor = self.flush_floor_read_s + self.flush_floor_write_s
        f = self.flush
        return {
            "redis": {"url": self.redis_url, "private": self.private,
                      "version": self.redis_version, "hiredis": self.hiredis,
                      "client": "one Python process, one connection pool"},
            "hour": self.hour.isoformat(),
            "fleet": {"tenants": self.tenants, "hosts": self.hosts,
                      "posts": self.posts, "names_per_post": self.names_per_post,
                      "observations": self.observations},
            "direct": {
                **direct.as_dict(),
                "what": f"UsageRecorder.post_host_metrics into the database, one transaction "
                        f"per post ({DIRECT_MINUTES} minutes of posts per host): today's path, "
                        "the baseline of single and pipelined",
            },
            "single": {
                **single.as_dict(),
                "what": "PostRecorder.host_post, one EVALSHA round trip per post: the hour's "
                        "last posts",
                "speedup_vs_direct": _ratio(single.per_s, direct.per_s),
                "floor_posts_per_s": round(self.single_floor.per_s, 1),
                "ratio_to_floor": _ratio(self.single_floor.per_s, single.per_s),
                "redis_us_per_post": self.server_us_single,
                "goal": f">= {GOALS['single_posts_per_s']:,} posts/s and >= "
                        f"{GOALS['single_speedup_vs_direct']}x direct",
                "goal_met": met["single_posts_per_s"] and met["single_speedup_vs_direct"],
            },
            "pipelined": {
                **piped.as_dict(),
                "what": f"PostRecorder.record_many, {PIPELINE_CHUNK:,} posts per round trip: "
                        "the rest of the hour",
                "speedup_vs_direct": _ratio(piped.per_s, direct.per_s),
                "floor_posts_per_s": round(self.pipelined_floor.per_s, 1),
                "ratio_to_floor": _ratio(self.pipelined_floor.per_s, piped.per_s),
                "redis_us_per_post": self.server_us_pipelined,
                "goal": f">= {GOALS['pipelined_posts_per_s']:,} posts/s",
                "goal_met": met["pipelined_posts_per_s"],
            },
            "floor": "HMGET of each post's names on its tenant's Redis dictionary (the names "
                     "sent and looked up, nothing written), through the same client: the "
                     "single posts one call each; the hour's first posts pipelined "
                     f"{PIPELINE_CHUNK:,} per round trip; ratio_to_floor = floor rate / rate",
            "memory": {
                **self.memory,
                "goal": f"<= {GOALS['bytes_per_host_hour']} bytes per host-hour (hour hashes)",
                "goal_met": met["bytes_per_host_hour"],
            },
            "flush": {
                "seconds": round(self.flush_s, 3),
                "what": "flush_usage of the hour into the database, released from Redis in "
                        "the same call; the fleet's first hour there, so the flush also "
                        "creates its tenants, hosts and database dictionaries",
                "observations": self.observations,
                "observations_per_s": (round(self.observations / self.flush_s)
                                       if self.flush_s else None),
                "host_hours_per_s": (round(f["host_hours"] / self.flush_s)
                                     if self.flush_s else None),
                "bits_per_s": round(f["metric_bits"] / self.flush_s) if self.flush_s else None,
                "floor_s": round(flush_floor, 3),
                "floor_read_s": round(self.flush_floor_read_s, 3),
                "floor_write_s": round(self.flush_floor_write_s, 3),
                "ratio": _ratio(self.flush_s, flush_floor),
                "floor": "the hour's hashes read back (one pipelined HGETALL per tenant-hour) "
                         "and as many rows (tenant, host, hour, kind, count, bitmap) written "
                         "into a temporary table with one executemany",
                "summary": f,
                "goal": f">= {GOALS['flush_observations_per_s']:,} observations/s",
                "goal_met": met["flush_observations_per_s"],
            },
            "goals_met": met,
            "step_s": round(self.step_s, 3),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class HotPathReport:
    """The step's outcome: figures, or why it was skipped or failed; and its checks."""

    timing: HotPathTiming | None = None
    skipped: str | None = None
    error: str | None = None
    checks: list[Check] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        if self.timing is not None:
            return self.timing.as_dict()
        if self.skipped is not None:
            return {"skipped": self.skipped}
        return {"error": self.error}


# --- the step ---------------------------------------------------------------------------------


def time_hot_path(
    engine: Engine, tier: BenchTier, hour: datetime, *, redis_url: str | None = None,
    cluster: bool = False, progress_factory: Progress = no_progress,
) -> HotPathReport:
    """Measure the hot path on ``tier``'s fleet at ``hour`` (an hour no other bench step
    writes); never raises for a Redis that is missing, not answering or not empty (skipped)."""
    import redis

    if not tier.hot_hosts:
        return HotPathReport(skipped="this tier measures no hot path")
    try:
        with bench_redis(redis_url, cluster=cluster) as target:
            try:
                timing, checks = _measure(engine, tier, hour, target, progress_factory)
            except (redis.RedisError, OSError) as exc:
                error = f"Redis failed during the hot-path step: {exc}"
                return HotPathReport(error=error, checks=[
                    Check(name="hot_path_ran", ok=False, details={"error": error})])
    except _Skipped as exc:
        return HotPathReport(skipped=str(exc))
    return HotPathReport(timing=timing, checks=checks)


def _hour_posts(fleet: list[Agent], hour: datetime, names: int, first: int,
                last: int) -> list[HostPost]:
    """Posts ``first`` … ``last - 1`` of the hour, minute by minute (every host each minute)."""
    posts = []
    for i in range(first, last):
        minute, k = divmod(i, len(fleet))
        a = fleet[k]
        posts.append(HostPost(tenant=a.tenant, host=a.host, kind=a.kind,
                              at=hour + timedelta(minutes=minute, seconds=7),
                              metrics=tuple(posted_names(a.pool, minute, names))))
    return posts


def _expected_metrics(fleet: list[Agent], names: int) -> int:
    """Distinct names each host posted in the hour, summed: the union of the pool positions
    the 60 minutes use, taken from each host's own pool."""
    positions = list(range(len(fleet[0].pool)))
    used: set[int] = set()
    for minute in range(60):
        used.update(posted_names(positions, minute, names))
    per_pool: dict[int, int] = {}
    total = 0
    for a in fleet:
        n = per_pool.get(id(a.pool))
        if n is None:
            n = per_pool[id(a.pool)] = len({a.pool[i] for i in used})
        total += n
    return total


def _evalsha_usec(client: Any) -> tuple[int, float] | None:
    """(calls, microseconds) Redis has spent in EVALSHA so far (read-only ``INFO``); ``None``
    for a cluster."""
    if hasattr(client, "get_primaries"):
        return None
    stats = client.info("commandstats").get("cmdstat_evalsha") or {}
    return int(stats.get("calls", 0)), float(stats.get("usec", 0))


def _per_call(before: tuple[int, float] | None, after: tuple[int, float] | None) -> float | None:
    if before is None or after is None or after[0] == before[0]:
        return None
    return round((after[1] - before[1]) / (after[0] - before[0]), 1)


def _time_direct(engine: Engine, tier: BenchTier, hour: datetime) -> Rate:
    n = tier.hot_direct_posts
    hosts = -(-n // DIRECT_MINUTES)
    fleet = agents(tenants=max(1, hosts // 5), hosts=hosts,
                   metrics_per_post=tier.metrics_per_post, prefix=DIRECT_PREFIX)
    posts = _hour_posts(fleet, hour, tier.metrics_per_post, 0, n)
    recorder = UsageRecorder(engine)
    started = time.perf_counter()
    for p in posts:
        recorder.post_host_metrics(tenant=p.tenant, host=p.host, kind=p.kind, at=p.at,
                                   metrics=list(p.metrics))
    return Rate(posts=n, seconds=time.perf_counter() - started)


def _measure(engine: Engine, tier: BenchTier, hour: datetime, target: _Target,
             progress_factory: Progress) -> tuple[HotPathTiming, list[Check]]:
    from redis.utils import HIREDIS_AVAILABLE

    from metering.flush import FLUSH_TIMEOUT, flush_usage

    step_started = time.perf_counter()
    names = tier.metrics_per_post
    fleet = agents(tenants=tier.hot_tenants, hosts=tier.hot_hosts, metrics_per_post=names,
                   prefix=HOT_PREFIX)
    tenants = sorted({a.tenant for a in fleet})
    total = 60 * len(fleet)
    single_n = min(tier.hot_single_posts, total)
    piped_n = total - single_n

    with progress_factory("hot path: direct (database)", None):
        direct = _time_direct(engine, tier, hour)

    recorder = PostRecorder.from_url(target.url, cluster=target.cluster, timeout=RECORD_TIMEOUT)
    client = recorder.client
    try:
        info = client.info("server")
        version = str(info.get("redis_version", "?")) if isinstance(info, dict) else "?"
        used_before = _used_memory(client)
        # the hour, pipelined (posts built untimed, a chunk at a time)
        seconds = 0.0
        before = _evalsha_usec(client)
        with progress_factory("hot path: an hour pipelined", piped_n) as update:
            for first in range(0, piped_n, GENERATE_CHUNK):
                posts = _hour_posts(fleet, hour, names, first,
                                    min(first + GENERATE_CHUNK, piped_n))
                started = time.perf_counter()
                recorder.record_many(posts)
                seconds += time.perf_counter() - started
                update(first + len(posts))
        pipelined = Rate(posts=piped_n, seconds=seconds)
        server_piped = _per_call(before, _evalsha_usec(client))
        # the hour's last posts, one call each
        last = _hour_posts(fleet, hour, names, piped_n, total)
        calls = [(p.tenant, p.host, p.kind, p.at, list(p.metrics)) for p in last]
        before = _evalsha_usec(client)
        with progress_factory("hot path: one call per post", None):
            started = time.perf_counter()
            for tenant, host, kind, at, metrics in calls:
                recorder.host_post(tenant=tenant, host=host, kind=kind, at=at, metrics=metrics)
            single = Rate(posts=single_n, seconds=time.perf_counter() - started)
        server_single = _per_call(before, _evalsha_usec(client))
        # floors: the same names looked up, nothing written
        single_floor = _time_floor_single(client, last, hour)
        pipelined_floor = _time_floor_pipelined(
            client, _hour_posts(fleet, hour, names, 0, min(FLOOR_POSTS, max(piped_n, 1))),
            hour)
        memory = _memory(client, tenants, hour, used_before)
        floor_read_s, rows = _time_read_floor(client, tenants, hour)
        floor_write_s = _time_write_floor(engine, rows)
        flusher = connect(target.url, cluster=target.cluster, timeout=FLUSH_TIMEOUT)
        try:
            with progress_factory("hot path: flush", len(tenants)) as update:
                started = time.perf_counter()
                summary = flush_usage(engine, flusher, release_before=hour + HOUR,
                                      hours=[hour], on_progress=lambda done, _t: update(done))
                flush_s = time.perf_counter() - started
        finally:
            flusher.close()
        checks = hot_path_checks(
            engine, client, tenant_prefix=f"{HOT_PREFIX}-", hour=hour, tenants=tenants,
            host_hours=len(fleet), host_metrics=_expected_metrics(fleet, names), posts=total,
            flushed_posts=summary.posts)
    finally:
        recorder.close()
    timing = HotPathTiming(
        redis_url=shown_url(target.url), private=target.private, redis_version=version,
        hiredis=bool(HIREDIS_AVAILABLE), hour=hour, tenants=len(tenants), hosts=len(fleet),
        names_per_post=names, direct=direct, pipelined=pipelined, single=single,
        pipelined_floor=pipelined_floor, single_floor=single_floor,
        server_us_pipelined=server_piped, server_us_single=server_single, memory=memory,
        flush_s=flush_s, flush=summary.as_dict(), flush_floor_read_s=floor_read_s,
        flush_floor_write_s=floor_write_s, observations=total * names,
        step_s=time.perf_counter() - step_started,
    )
    return timing, checks


# --- floors -----------------------------------------------------------------------------------


def _dict_key(tenant: str, hour: datetime) -> str:
    return hour_keys(tenant, "host", int(hour.timestamp()) // 3600)[0]


def _time_floor_single(client: Any, posts: list[HostPost], hour: datetime) -> Rate:
    calls = [(_dict_key(p.tenant, hour), list(p.metrics)) for p in posts]
    started = time.perf_counter()
    for key, metrics in calls:
        client.hmget(key, metrics)
    return Rate(posts=len(calls), seconds=time.perf_counter() - started)


def _time_floor_pipelined(client: Any, posts: list[HostPost], hour: datetime) -> Rate:
    calls = [(_dict_key(p.tenant, hour), p.metrics) for p in posts]
    started = time.perf_counter()
    for first in range(0, len(calls), PIPELINE_CHUNK):
        with client.pipeline(transaction=False) as pipe:
            for key, metrics in calls[first:first + PIPELINE_CHUNK]:
                pipe.hmget(key, metrics)
            pipe.execute()
    return Rate(posts=len(calls), seconds=time.perf_counter() - started)


def _time_read_floor(client: Any, tenants: list[str], hour: datetime
                     ) -> tuple[float, list[dict[str, Any]]]:
    """Seconds to read the hour's host hashes back (pipelined ``HGETALL``, 2,000 a round trip,
    as the flush groups them) and the rows a plain write of them would insert."""
    h = int(hour.timestamp()) // 3600
    replies: list[Any] = []
    started = time.perf_counter()
    for first in range(0, len(tenants), 2000):
        with client.pipeline(transaction=False) as pipe:
            for tenant in tenants[first:first + 2000]:
                pipe.hgetall(hour_keys(tenant, "host", h)[1])
            replies.extend(pipe.execute())
    seconds = time.perf_counter() - started
    rows = [{"tenant": tenant, "host": host.decode("utf-8", "replace"), "hour": hour,
             "standard": bool(value[0] & 1),
             "metric_count": value_bits(value).bit_count(),
             "metric_bits": value[1:]}
            for tenant, hashed in zip(tenants, replies, strict=True)
            for host, value in hashed.items()]
    return seconds, rows


_FLOOR_TABLE = "hot_path_floor_rows"


def _time_write_floor(engine: Engine, rows: list[dict[str, Any]]) -> float:
    """Seconds to write ``rows`` into a temporary table with one ``executemany`` (rolled
    back)."""
    blob = "BYTEA" if engine.dialect.name == "postgresql" else "BLOB"
    ts = "TIMESTAMPTZ" if engine.dialect.name == "postgresql" else "TIMESTAMP"
    insert = sa.text(
        f"INSERT INTO {_FLOOR_TABLE} (tenant, host, hour, standard, metric_count, metric_bits)"
        " VALUES (:tenant, :host, :hour, :standard, :metric_count, :metric_bits)"
    ).bindparams(sa.bindparam("hour", type_=UTCDateTime),
                 sa.bindparam("metric_bits", type_=sa.LargeBinary))
    with engine.connect() as conn:
        started = time.perf_counter()
        conn.exec_driver_sql(
            f"CREATE TEMPORARY TABLE {_FLOOR_TABLE} (tenant VARCHAR(200), host VARCHAR(255), "
            f"hour {ts}, standard BOOLEAN, metric_count INTEGER, metric_bits {blob})")
        if rows:
            conn.execute(insert, rows)
        seconds = time.perf_counter() - started
        conn.rollback()  # the temporary table goes with the transaction
    return seconds


# --- memory -----------------------------------------------------------------------------------


def _used_memory(client: Any) -> int | None:
    if hasattr(client, "get_primaries"):
        return None
    return int(client.info("memory").get("used_memory", 0))


def _memory(client: Any, tenants: list[str], hour: datetime, used_before: int | None
            ) -> dict[str, Any]:
    """``MEMORY USAGE … SAMPLES 0`` (every element counted) of each tenant's hour hash,
    dictionary and post counter; the hour hashes' fields and values read for their sizes."""
    h = int(hour.timestamp()) // 3600
    keys = [hour_keys(t, "host", h) for t in tenants]

    def each(queue: Callable[[Any, str], object], which: int) -> list[Any]:
        """``queue(pipe, key)`` for key ``which`` (0 dictionary, 1 hour hash, 2 post counter)
        of every tenant, pipelined; the replies."""
        out: list[Any] = []
        for first in range(0, len(keys), 1000):
            with client.pipeline(transaction=False) as pipe:
                for k in keys[first:first + 1000]:
                    queue(pipe, k[which])
                out.extend(pipe.execute())
        return out

    def usage(pipe: Any, key: str) -> object:
        return pipe.memory_usage(key, samples=0)

    def length(pipe: Any, key: str) -> object:
        return pipe.hlen(key)

    hour_bytes, dict_bytes, posts_bytes = (sum(int(n or 0) for n in each(usage, which))
                                           for which in (1, 0, 2))
    host_hours = sum(int(n) for n in each(length, 1))
    names = sum(int(n) for n in each(length, 0))
    encodings: dict[str, int] = {}
    for enc in each(lambda pipe, key: pipe.object("encoding", key), 1):
        name = enc.decode() if isinstance(enc, bytes) else str(enc)
        encodings[name] = encodings.get(name, 0) + 1
    field_bytes = value_bytes = 0
    for hashed in each(lambda pipe, key: pipe.hgetall(key), 1):
        for f, v in hashed.items():
            field_bytes += len(f)
            value_bytes += len(v)
    used_after = _used_memory(client)
    per = (lambda n: round(n / host_hours, 1)) if host_hours else (lambda n: None)
    return {
        "host_hours": host_hours,
        "hour_hash_bytes": hour_bytes,
        "bytes_per_host_hour": per(hour_bytes),
        "host_field_bytes_mean": per(field_bytes),
        "bitmap_value_bytes_mean": per(value_bytes),
        "hour_hash_encodings": encodings,
        "post_counter_bytes": posts_bytes,
        "dictionaries": {
            "tenants": len(tenants), "names": names, "bytes": dict_bytes,
            "bytes_per_tenant": round(dict_bytes / len(tenants), 1) if tenants else None,
            "bytes_per_name": round(dict_bytes / names, 1) if names else None,
        },
        "bytes_per_host_hour_all_keys": per(hour_bytes + dict_bytes + posts_bytes),
        "used_memory_growth": (used_after - used_before
                               if used_after is not None and used_before is not None else None),
        "what": "MEMORY USAGE key SAMPLES 0 of the hour hashes hm:{T}:host:H over the "
                "host-hours they hold; dictionaries and post counters apart; "
                "used_memory_growth is INFO used_memory after the hour minus before",
    }

