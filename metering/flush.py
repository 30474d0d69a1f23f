"""``flush-usage``'s work: move the hours held in Redis into the database, exactly once.

For every tenant-hour Redis holds (found by ``SCAN`` of ``hm:{*}:posts:*`` on every primary):

1. read it atomically (``read_hour.lua``: the posts counter and both hashes in one step);
2. translate its bitmaps from the tenant's Redis dictionary to its database dictionary and merge
   them into ``host_hours`` / ``service_hours`` with ingest's bit-OR merge
   (:func:`metering.ingest.merge_bitmaps`: the same locks, the same SQL), one transaction per
   group of tenants;
3. after that transaction has committed, and only for hours older than ``release_before``,
   delete the tenant-hour from Redis (``release_hour.lua``) — unless a post arrived since step 1
   (the counter moved), in which case it stays for the next flush.

Merging is a bit-OR, so a flush that is killed anywhere and run again adds nothing twice: before
the commit nothing is written; after it, the same bits are merged again and change nothing; a
tenant-hour is deleted only once its bits are in the database. Nothing in Redis expires by
itself. Names, hosts or tenants that ingest would refuse (only a caller that skipped
``record.lua``'s checks can put them there) are skipped and reported, not written.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine

from metering.hotpath import (
    KEY_PREFIX,
    HotPathUnavailable,
    connect_settings,
    pipelined,
    redis_down,
    tenant_key,
    value_bits,
)
from metering.ingest import BitmapSink, merge_bitmaps, service_metric_key
from metering.records import checked_metric, checked_text
from metering.settings import Settings

__all__ = ["FlushSummary", "flush_configured", "flush_usage", "held_hours"]

GROUP_TENANTS = 400
"""Tenants merged per database transaction (below ingest's per-tenant lock limit, so a flush
runs beside ingests of other tenants on PostgreSQL)."""
GROUP_TENANT_HOURS = 2_000
"""Tenant-hours read from Redis per group, at most."""
KEEP_PROBLEMS = 20
FLUSH_TIMEOUT = 30.0
"""Seconds a flush waits for one Redis reply (a pipeline of a few thousand reads)."""
_POSTS = ":posts:"


@dataclass(slots=True, kw_only=True)
class FlushSummary:
    """What one flush did."""

    tenant_hours: int = 0
    """Tenant-hours read from Redis and merged into the database."""
    host_hours: int = 0
    service_hours: int = 0
    metric_bits: int = 0
    """Distinct (host or tenant, hour, metric) observations merged: set bits."""
    posts: int = 0
    """Posts the merged tenant-hours had counted."""
    rows_written: int = 0
    released: int = 0
    """Tenant-hours deleted from Redis after the commit."""
    kept: int = 0
    """Tenant-hours left in Redis: recent (the snapshot may look at them again) or posted to
    since they were read."""
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant_hours": self.tenant_hours, "host_hours": self.host_hours,
            "service_hours": self.service_hours, "metric_bits": self.metric_bits,
            "posts": self.posts, "rows_written": self.rows_written,
            "released": self.released, "kept": self.kept, "skipped": self.skipped,
        }

    def add(self, other: FlushSummary) -> None:
        """Count ``other`` (one group's) in with this one."""
        for name in ("tenant_hours", "host_hours", "service_hours", "metric_bits", "posts",
                     "rows_written", "released", "kept", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.problems.extend(other.problems[:KEEP_PROBLEMS - len(self.problems)])

    def problem(self, text: str) -> None:
        self.skipped += 1
        if len(self.problems) < KEEP_PROBLEMS:
            self.problems.append(text)


def _primaries(client: Any) -> list[Any]:
    """One plain client per primary node (a single server is its own)."""
    get_primaries = getattr(client, "get_primaries", None)
    if get_primaries is None:
        return [client]
    return [client.get_redis_connection(node) for node in get_primaries()]


def held_hours(client: Any) -> dict[str, set[int]]:
    """Every tenant-hour Redis holds: tenant → epoch hours (one ``SCAN`` pass per primary)."""

    held: dict[str, set[int]] = {}
    try:
        for node in _primaries(client):
            for raw in node.scan_iter(match=f"{KEY_PREFIX}{{*}}{_POSTS}*", count=1000):
                key = raw.decode("utf-8", "surrogateescape")
                head, sep, hour = key.rpartition("}" + _POSTS)
                if not sep or not hour.isdigit() or not head.startswith(KEY_PREFIX + "{"):
                    continue
                held.setdefault(head[len(KEY_PREFIX) + 1:], set()).add(int(hour))
    except redis_down() as exc:
        raise HotPathUnavailable(f"Redis did not answer: {exc}") from None
    return held


def _groups(held: dict[str, set[int]]) -> Iterator[list[tuple[str, int]]]:
    group: list[tuple[str, int]] = []
    tenants = 0
    for tenant in sorted(held):
        hours = sorted(held[tenant])
        if group and (tenants >= GROUP_TENANTS or len(group) + len(hours) > GROUP_TENANT_HOURS):
            yield group
            group, tenants = [], 0
        group.extend((tenant, h) for h in hours)
        tenants += 1
    if group:
        yield group


def _keys(tenant: str, hour: int) -> list[str]:
    """``read_hour.lua``'s and ``release_hour.lua``'s keys of a tenant-hour."""
    return [tenant_key(tenant, f"posts:{hour}"), tenant_key(tenant, f"host:{hour}"),
            tenant_key(tenant, f"service:{hour}")]


def _pairs(flat: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
    it = iter(flat)
    return zip(it, it, strict=True)


def _text(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class _Translation:
    """One tenant's Redis ids → database bits, for one namespace, built lazily."""

    def __init__(self, sink: BitmapSink, tenant_id: int, namespace: str,
                 names: dict[int, str | None], summary: FlushSummary, tenant: str) -> None:
        self.sink, self.tenant_id, self.namespace = sink, tenant_id, namespace
        self.names, self.summary, self.tenant = names, summary, tenant
        self.cache: dict[bytes, int] = {}

    def bits(self, value: bytes, prefix: str = "") -> int:
        """The database bitmap of a Redis value's bitmap (:func:`value_bits`; ``ValueError``
        when the value is malformed); ``prefix`` names service metrics by their service."""
        key = value[1:] if not prefix else prefix.encode() + b"\0" + value[1:]
        found = self.cache.get(key)
        if found is not None:
            return found
        redis_bits = value_bits(value)
        names: list[str] = []
        while redis_bits:
            low = redis_bits & -redis_bits
            name = self.names.get(low.bit_length() - 1)
            if name is None or not checked_metric(name):
                self.summary.problem(f"tenant {self.tenant!r}: {self.namespace} metric id "
                                     f"{low.bit_length() - 1} has no valid name; skipped")
            else:
                names.append(service_metric_key(prefix, name) if prefix else name)
            redis_bits ^= low
        bits = self.sink.bits(self.tenant_id, self.namespace, names) if names else 0
        self.cache[key] = bits
        return bits


def _fields(flat: list[bytes], field: str, translation: _Translation, part: FlushSummary,
            tenant: str) -> Iterator[tuple[str, bytes, int]]:
    """The (name, value, database bits) of an hour hash's fields (hosts, or services: a
    service's metrics are named by it), skipping and reporting a name ingest would refuse or a
    malformed value."""
    for raw, value in _pairs(flat):
        name = _text(raw)
        if name is None or not checked_text(field, name) or not value:
            part.problem(f"tenant {tenant!r}: {field} {raw!r} is not one ingest accepts; "
                         "skipped")
            continue
        try:
            bits = translation.bits(value, name if field == "service" else "")
        except ValueError as exc:
            part.problem(f"tenant {tenant!r}: {field} {name!r} has a malformed value ({exc}); "
                         "skipped")
            continue
        yield name, value, bits


def flush_configured(engine: Engine, settings: Settings, *, release_before: datetime | None,
                     hours: Collection[datetime] | None = None,
                     on_progress: Callable[[int, int], None] | None = None,
                     ) -> FlushSummary | None:
    """:func:`flush_usage` against ``HOSTMETER_REDIS_URL`` (a client with the flush's timeout,
    closed after), or ``None`` when no hot path is configured."""
    client = connect_settings(settings, timeout=FLUSH_TIMEOUT)
    if client is None:
        return None
    try:
        return flush_usage(engine, client, release_before=release_before, hours=hours,
                           on_progress=on_progress)
    finally:
        client.close()


def flush_usage(
    engine: Engine,
    client: Any,
    *,
    release_before: datetime | None,
    hours: Collection[datetime] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> FlushSummary:
    """Move the tenant-hours Redis holds (only ``hours``, if given) into the database; delete
    from Redis those before ``release_before`` once committed (``None``: delete nothing).
    ``on_progress(done, total)`` hears of each group of tenant-hours merged."""

    only = None if hours is None else {int(h.timestamp()) // 3600 for h in hours}
    held = held_hours(client)
    if only is not None:
        held = {t: hs & only for t, hs in held.items() if hs & only}
    release_hour = (None if release_before is None
                    else int(release_before.timestamp()) // 3600)
    total = sum(len(hs) for hs in held.values())
    summary = FlushSummary()
    done = 0
    for group in _groups(held):
        try:
            replies = pipelined(client, "read_hour", [(_keys(t, h), ()) for t, h in group])
            tenants = sorted({t for t, _ in group})
            with client.pipeline(transaction=False) as pipe:
                for tenant in tenants:
                    pipe.hgetall(tenant_key(tenant, "dict:host"))
                    pipe.hgetall(tenant_key(tenant, "dict:service"))
                dicts = pipe.execute()
        except redis_down() as exc:
            raise HotPathUnavailable(f"Redis did not answer the flush: {exc}") from None
        dictionaries = {
            t: ({int(v): _text(k) for k, v in dicts[2 * i].items()},
                {int(v): _text(k) for k, v in dicts[2 * i + 1].items()})
            for i, t in enumerate(tenants)
        }
        part = FlushSummary()

        def work(sink: BitmapSink, attempt: int, group: list[tuple[str, int]] = group,
                 replies: list[Any] = replies, dictionaries: Any = dictionaries) -> None:
            nonlocal part
            part = FlushSummary()
            translations: dict[str, tuple[_Translation, _Translation] | None] = {}
            for (tenant, hour), (posts, host_flat, service_flat) in zip(
                    group, replies, strict=True):
                if tenant not in translations:
                    if not checked_text("tenant", tenant):
                        part.problem(f"tenant {tenant!r} is not one ingest accepts; skipped")
                        translations[tenant] = None
                    else:
                        tid = sink.tenant_id(tenant)
                        host_names, service_names = dictionaries[tenant]
                        translations[tenant] = (
                            _Translation(sink, tid, "host", host_names, part, tenant),
                            _Translation(sink, tid, "service", service_names, part, tenant))
                pair = translations[tenant]
                if pair is None:
                    continue
                host_tr, service_tr = pair
                at = datetime.fromtimestamp(hour * 3600, UTC)
                part.tenant_hours += 1
                part.posts += int(posts)
                for host, value, bits in _fields(host_flat, "host", host_tr, part, tenant):
                    if bits:
                        sink.add_host(host_tr.tenant_id, host, at, bool(value[0] & 1), bits)
                        part.host_hours += 1
                        part.metric_bits += bits.bit_count()
                service_bits = 0
                for _, _, bits in _fields(service_flat, "service", service_tr, part, tenant):
                    service_bits |= bits
                if service_bits:
                    sink.add_service(service_tr.tenant_id, at, service_bits)
                    part.service_hours += 1
                    part.metric_bits += service_bits.bit_count()

        part.rows_written = merge_bitmaps(engine, work).written_rows
        summary.add(part)
        # Committed: forget the old hours whose counter has not moved since they were read.
        releasable = [(key, reply[0]) for key, reply in zip(group, replies, strict=True)
                      if release_hour is not None and key[1] < release_hour]
        summary.kept += len(group) - len(releasable)
        if releasable:
            try:
                gone = pipelined(client, "release_hour",
                                 [(_keys(t, h), (posts,)) for (t, h), posts in releasable])
            except redis_down() as exc:
                raise HotPathUnavailable(
                    f"Redis did not answer the flush after the commit (the hours are in the "
                    f"database; the next flush merges them again, adding nothing): {exc}"
                ) from None
            summary.released += sum(int(g) for g in gone)
            summary.kept += sum(1 for g in gone if not int(g))
        done += len(group)
        if on_progress is not None:
            on_progress(done, total)
    return summary
