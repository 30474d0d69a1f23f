"""Recording at post time: the Redis (ElastiCache) hot path.

An API server records each metric post with **one round trip** to Redis: the Lua script
``metering/lua/record.lua`` (its header is the protocol, for callers in any language) ORs the
post's names into the bitmap of its (tenant, UTC hour, host), numbering names new to the tenant
in a per-tenant Redis dictionary. A repeated post sets nothing, so Redis holds one small value
per host-hour, not one per post. ``flush-usage`` (:mod:`metering.flush`) moves the hours into
``host_hours`` / ``service_hours`` with ingest's bit-OR merge.

Keys, all of one tenant in one Redis Cluster slot (the ``{tenant}`` hash tag)::

    hm:{T}:dict:host      HASH  host metric name -> dense id (the Redis dictionary)
    hm:{T}:dict:service   HASH  service metric name -> dense id
    hm:{T}:host:H         HASH  host -> flags byte + bitmap of ids
    hm:{T}:service:H      HASH  service -> flags byte + bitmap of ids
    hm:{T}:posts:H        STRING posts recorded in the tenant-hour (also the hour's version)

``H`` is the UTC hour as whole hours since the epoch. Only metric posts take this path; plan
changes, monitors and anomaly-detection roles are rare and go straight to the database
(:class:`metering.ingest.UsageRecorder` or ``hostmeter ingest``).

:class:`PostRecorder` is the helper for Python API servers: a pooled client with a bounded
timeout, :meth:`~PostRecorder.host_post` (one call) and :meth:`~PostRecorder.record_many`
(pipelined). When Redis does not answer it raises :class:`HotPathUnavailable` — or, given a
``spool`` file, appends the post there as an ingest record (``hostmeter ingest`` loads it later,
idempotently) and returns ``"spooled"``: no post is lost either way.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Literal

import msgspec

from metering.errors import ConfigError, HotPathRejected, HotPathUnavailable
from metering.records import (
    BYTE_LIMITS,
    EARLIEST,
    LATEST,
    HostPost,
    ServicePost,
    checked_metric,
    checked_text,
)
from metering.settings import Settings

__all__ = [
    "DEFAULT_TIMEOUT",
    "PROTOCOL_VERSION",
    "HotPathRejected",
    "HotPathUnavailable",
    "PostRecorder",
    "connect",
    "connect_settings",
    "epoch_hour",
    "hour_keys",
    "pipelined",
    "redis_down",
    "script",
    "shown_url",
    "tenant_key",
    "value_bits",
]

PROTOCOL_VERSION = 1
DEFAULT_TIMEOUT = 0.25
"""Seconds a post-path call waits for Redis (connect or reply) before it gives up."""
PIPELINE_CHUNK = 1000
"""Posts sent per pipeline round trip by :meth:`PostRecorder.record_many`."""
KEY_PREFIX = "hm:"
LUA_DIR = Path(__file__).resolve().parent / "lua"
"""Where the shipped Lua scripts are (installed with the package: package-data)."""


@cache
def script(name: str) -> str:
    """The text of a shipped Lua script (``record``, ``read_hour``, ``release_hour``)."""
    # Next to this module, as billing's catalogs are: importlib.resources.files("metering") is
    # the namespace package tests/metering under pytest (a MultiplexedPath, whose joinpath takes
    # one name on Python 3.11), and the scripts are not there.
    return (LUA_DIR / f"{name}.lua").read_text("utf-8")


def script_sha(name: str) -> str:
    """The SHA-1 that ``EVALSHA`` calls the script by (what ``SCRIPT LOAD`` returns)."""
    return hashlib.sha1(script(name).encode("utf-8")).hexdigest()


def value_bits(value: bytes) -> int:
    """The bitmap (bit ``id`` set for each dictionary id posted) of a field of an hour hash,
    decoded from ``record.lua``'s value layout: a flags byte, then segments of a 3-byte
    big-endian count of zero bytes skipped, a 1-byte length ``n`` and ``n`` bitmap bytes."""
    bits = 0
    pos, index, size = 1, 0, len(value)
    if not size:
        raise ValueError("an empty value (no flags byte)")
    while pos < size:
        if pos + 4 > size or pos + 4 + value[pos + 3] > size:
            raise ValueError(f"a segment at byte {pos} runs past the value's {size} bytes")
        index += int.from_bytes(value[pos:pos + 3], "big")
        n = value[pos + 3]
        bits |= int.from_bytes(value[pos + 4:pos + 4 + n], "little") << (8 * index)
        index += n
        pos += 4 + n
    return bits


def tenant_key(tenant: str, rest: str) -> str:
    """``hm:{tenant}:rest``: a key of the tenant (the one place that spells the layout; the
    tenant is not checked: the flush and the status command name tenants Redis already holds)."""
    return f"{KEY_PREFIX}{{{tenant}}}:{rest}"


def tenant_tag(tenant: str) -> str:
    """``hm:{tenant}``: the prefix of every key of a tenant (checked: no braces)."""
    if "{" in tenant or "}" in tenant or not checked_text("tenant", tenant):
        raise HotPathRejected(
            f"tenant {tenant!r} cannot be recorded at post time (a tenant key there is 1 to 200 "
            "bytes without NUL, '{' or '}'); record it with hostmeter ingest"
        )
    return f"{KEY_PREFIX}{{{tenant}}}"


def shown_url(url: str) -> str:
    """A Redis URL as errors and reports print it: scheme, host, port and database, never the
    user or the password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def redis_down() -> tuple[type[Exception], ...]:
    """The redis-py exceptions that mean Redis did not do what was asked (a cluster's
    ``RedisClusterException``, e.g. no node answering, is not a ``RedisError``)."""
    import redis

    return (redis.RedisError, redis.exceptions.RedisClusterException)


def epoch_hour(at: datetime) -> int:
    """``at``'s UTC hour as whole hours since 1970-01-01T00:00:00Z (the ``H`` of the keys)."""
    if at.tzinfo is None:
        raise HotPathRejected(f"instant {at.isoformat()} has no time zone")
    if not EARLIEST <= at < LATEST:  # ingest's range; record.lua refuses a negative hour
        raise HotPathRejected(f"instant {at.isoformat()} is not in [{EARLIEST.year}, "
                              f"{LATEST.year}) (ingest refuses it too)")
    return int(at.timestamp()) // 3600


def hour_keys(tenant: str, namespace: str, hour: int) -> tuple[str, str, str]:
    """``record.lua``'s three keys for a post of ``namespace`` (``host``/``service``)."""
    tenant_tag(tenant)  # checked
    return (tenant_key(tenant, f"dict:{namespace}"), tenant_key(tenant, f"{namespace}:{hour}"),
            tenant_key(tenant, f"posts:{hour}"))


def connect(url: str, *, cluster: bool = False, timeout: float = DEFAULT_TIMEOUT,
            max_connections: int = 64) -> Any:
    """A redis-py client for ``url`` that fails fast: ``timeout`` seconds to connect and to
    read a reply, no retries (the caller decides: spool, or let the job fail and run again).

    A single server gets a blocking pool of ``max_connections`` shared by threads; a cluster
    (``cluster=True``, ElastiCache with cluster mode on) a :class:`redis.cluster.RedisCluster`,
    which reads the slot map from the node in ``url`` (so it needs Redis up to be made).
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    try:
        if cluster:
            from redis.cluster import RedisCluster

            return RedisCluster.from_url(url, **options)
        packer = _ArgumentPacker.made()
        if packer is not None:  # RedisCluster does not pass it on to its nodes
            options["command_packer"] = packer
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, **options)
        return redis.Redis(connection_pool=pool)
    except ValueError as exc:
        raise ConfigError(f"HOSTMETER_REDIS_URL is not a Redis URL: {exc}",
                          setting="HOSTMETER_REDIS_URL") from None
    except redis_down() as exc:
        raise HotPathUnavailable(f"Redis at {shown_url(url)} did not answer: {exc}") from None


class _ArgumentPacker:
    """redis-py's command packer with hiredis, without redis-py's Python pass over every
    argument.

    redis-py encodes each argument in Python (``Encoder.encode``: type checks, then
    ``str.encode``) before it hands the command to hiredis: about 0.5 µs an argument, some
    50 µs for a post of 100 names, as long as Redis takes to run ``record.lua`` on it. hiredis
    encodes ``str`` (UTF-8, strict), ``bytes``, ``int`` and ``float`` (``repr``) itself, in C,
    to the same bytes; a command with any other argument (hiredis raises ``TypeError``: a
    ``bool``, ``None``, a ``bytearray``), or whose name holds a space (``SCRIPT LOAD``), goes
    through redis-py's own packer, unchanged.
    """

    def __init__(self, fallback: Any, pack_command: Any) -> None:
        self._fallback = fallback
        self._pack_command = pack_command

    @classmethod
    def made(cls) -> _ArgumentPacker | None:
        """A packer for a connection of redis-py's default encoding (UTF-8, strict, bytes
        replies: what :func:`connect` makes), or ``None`` without hiredis."""
        try:
            import hiredis
            from redis.connection import (
                Encoder,
                HiredisRespSerializer,
                PythonRespSerializer,
            )
            from redis.utils import HIREDIS_AVAILABLE
        except ImportError:
            return None
        if not HIREDIS_AVAILABLE:
            return None
        encode = Encoder("utf-8", "strict", False).encode
        default = HiredisRespSerializer(PythonRespSerializer(6000, encode).pack, encode)
        return cls(default, hiredis.pack_command)

    def pack(self, *args: Any) -> list[bytes]:
        command = args[0]
        if isinstance(command, str) and " " not in command:
            try:
                return [self._pack_command(args)]
            except TypeError:
                pass
        return list(self._fallback.pack(*args))


def connect_settings(settings: Settings, *, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """A client for ``HOSTMETER_REDIS_URL`` (``HOSTMETER_REDIS_CLUSTER``), or ``None`` when no
    hot path is configured."""
    if not settings.redis_url:
        return None
    return connect(settings.redis_url, cluster=settings.redis_cluster, timeout=timeout)


def pipelined(client: Any, name: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]],
              ) -> list[Any]:
    """Run the shipped script ``name`` once per ``(keys, args)`` in one pipeline (not a
    transaction; a cluster client sends each node its share) and return the replies in order.

    The script is loaded first if a node does not know it (``SCRIPT LOAD`` goes to every
    primary; a restarted or new node has an empty script cache), and the pipeline sent again:
    the scripts are idempotent, so a call that ran before the error changes nothing the
    second time. Raises :class:`redis.RedisError` as the client does."""
    import redis

    sha = script_sha(name)
    for attempt in (0, 1):
        try:
            with client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(sha, len(keys), *keys, *args)
                return list(pipe.execute())
        except redis.ResponseError as exc:
            if attempt or ("NOSCRIPT" not in str(exc) and "No matching script" not in str(exc)):
                raise
            client.script_load(script(name))
    raise AssertionError("unreachable")


class _Spool:
    """Posts Redis did not take, appended as ingest records (JSON Lines, one line per post,
    written with a single ``write`` under a lock and flushed to the OS: a reader of the file
    sees whole lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.encode = msgspec.json.Encoder().encode

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        data = b"".join(self.encode(r) + b"\n" for r in records)
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        return data.count(b"\n")


Post = HostPost | ServicePost
Outcome = Literal["recorded", "spooled"]


@dataclass(slots=True)
class BatchResult:
    """What :meth:`PostRecorder.record_many` did with its posts."""

    recorded: int = 0
    spooled: int = 0


class PostRecorder:
    """Records metric posts in Redis: the post-time API for Python API servers.

    >>> recorder = PostRecorder.from_url("redis://cache:6379/0", spool="/var/spool/hm.jsonl")
    >>> recorder.host_post(tenant="acme", host="h-1", kind="standard",
    ...                    at=datetime.now(UTC), metrics=["loadavg5", "cpu.user"])
    'recorded'

    Values are checked as ingest checks them (:class:`HotPathRejected` if not). A call that Redis
    does not answer within ``timeout`` raises :class:`HotPathUnavailable`, unless ``spool`` is
    set: then the post is appended to that JSON Lines file in the ingest schema and the call
    returns ``"spooled"`` (load the file later with ``hostmeter ingest``; loading twice changes
    nothing). Thread-safe: threads share the connection pool.
    """

    def __init__(self, client: Any, *, spool: str | Path | None = None) -> None:
        self.client = client
        self.spool = _Spool(Path(spool)) if spool is not None else None
        self._record = client.register_script(script("record"))

    @classmethod
    def from_url(cls, url: str, *, cluster: bool = False, timeout: float = DEFAULT_TIMEOUT,
                 max_connections: int = 64, spool: str | Path | None = None) -> PostRecorder:
        return cls(connect(url, cluster=cluster, timeout=timeout,
                           max_connections=max_connections), spool=spool)

    # -- one post, one round trip --------------------------------------------------------------

    def host_post(self, *, tenant: str, host: str, kind: str, at: datetime,
                  metrics: Sequence[str]) -> Outcome:
        """Record one agent post."""
        return self.record(HostPost(tenant=tenant, host=host, kind=kind, at=at,
                                    metrics=tuple(metrics)))

    def service_post(self, *, tenant: str, service: str, at: datetime,
                     metrics: Sequence[str]) -> Outcome:
        """Record one post of service metrics."""
        return self.record(ServicePost(tenant=tenant, service=service, at=at,
                                       metrics=tuple(metrics)))

    def record(self, post: Post) -> Outcome:
        keys, args = _call(post)
        try:
            self._record(keys=keys, args=args)
        except Exception as exc:
            self._unavailable(exc, [post])
            return "spooled"
        return "recorded"

    # -- many posts, one round trip per PIPELINE_CHUNK ----------------------------------------

    def record_many(self, posts: Sequence[Post]) -> BatchResult:
        """Record posts pipelined (:data:`PIPELINE_CHUNK` per round trip). Every post is checked
        before any is sent. If Redis fails part-way, the posts of the chunks not confirmed are
        spooled (or :class:`HotPathUnavailable` is raised): a post of a failed chunk that Redis
        did record is recorded again from the spool, which changes nothing."""
        calls = [_call(post) for post in posts]
        result = BatchResult()
        for first in range(0, len(calls), PIPELINE_CHUNK):
            chunk = calls[first:first + PIPELINE_CHUNK]
            try:
                pipelined(self.client, "record", chunk)
            except Exception as exc:
                rest = list(posts[first:])
                self._unavailable(exc, rest)
                result.spooled += len(rest)
                return result
            result.recorded += len(chunk)
        return result

    def _unavailable(self, exc: Exception, posts: list[Post]) -> None:
        import redis

        if isinstance(exc, redis.ResponseError) and "hostmeter:" in str(exc):
            raise HotPathRejected(str(exc)) from None  # the script refused the values
        if not isinstance(exc, redis_down()):
            raise exc  # not Redis failing: a bug to see, not a post to spool
        if self.spool is None:
            raise HotPathUnavailable(f"Redis did not take the post: {exc}") from None
        self.spool.append(_as_record(p) for p in posts)

    def close(self) -> None:
        self.client.close()


def _call(post: Post) -> tuple[tuple[str, str, str], list[str]]:
    """``record.lua``'s keys and arguments for ``post`` (its values checked first)."""
    if not post.metrics or not _metrics_ok(post.metrics):
        raise HotPathRejected(
            f"post of {post.tenant!r} has no metric names or one that ingest refuses "
            "(1 to 500 bytes of UTF-8 without NUL, not blank)")
    hour = epoch_hour(post.at)
    if isinstance(post, HostPost):
        if not checked_text("host", post.host) or post.kind not in ("standard", "micro"):
            raise HotPathRejected(f"host post of {post.tenant!r}: host {post.host!r} or kind "
                                  f"{post.kind!r} is not one ingest accepts")
        return hour_keys(post.tenant, "host", hour), [post.host, post.kind, *post.metrics]
    if not checked_text("service", post.service):
        raise HotPathRejected(f"service post of {post.tenant!r}: service {post.service!r} is "
                              "not one ingest accepts")
    return hour_keys(post.tenant, "service", hour), [post.service, "service", *post.metrics]


_METRIC_LIMIT = BYTE_LIMITS["metrics"]


def _metrics_ok(names: Sequence[str]) -> bool:
    """``all(checked_metric(n) for n in names)``, with the usual case (ASCII names, each its own
    size in bytes) checked by a few passes in C instead of a Python call per name."""
    try:
        joined = "\n".join(names)
    except TypeError:  # not all str
        return False
    if (joined.isascii() and "\0" not in joined
            and max(map(len, names), default=0) <= _METRIC_LIMIT
            and all(map(str.strip, names))):
        return True
    return all(checked_metric(n) for n in names)


def _as_record(post: Post) -> dict[str, Any]:
    """``post`` as a line of ``hostmeter ingest`` (schema version 1)."""
    at = post.at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(post, HostPost):
        return {"type": "host_post", "tenant": post.tenant, "host": post.host,
                "kind": post.kind, "at": at, "metrics": list(post.metrics)}
    return {"type": "service_post", "tenant": post.tenant, "service": post.service, "at": at,
            "metrics": list(post.metrics)}
