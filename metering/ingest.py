"""Recording usage: the ingest repository.

:class:`UsageRecorder` is the one writer. ``hostmeter ingest`` feeds it JSON Lines; the SaaS's
metric-post path calls :meth:`UsageRecorder.record` (or :meth:`UsageRecorder.post_host_metrics`)
with records it built itself. Both end in the same SQL.

Exactness without a row per post: every distinct metric name gets a dense per-tenant ordinal
(``metric_names``), and each (host, hour) keeps the bitmap of ordinals it posted. A new post ORs
its bits into the bitmap; ``metric_count`` is the bitmap's population count. Loading the same
post again ORs in bits that are already set and writes nothing.

Writers of the same tenant are serialised, so the read-merge-write of a bitmap and the
assignment of new ordinals never race. SQLite has one writer at a time (``BEGIN IMMEDIATE``).
PostgreSQL runs ingests of different tenants in parallel (:class:`_TenantLocks`): each input
holds the ingest lock *shared* and a transaction-scoped advisory lock per tenant, taken the first
time the input names the tenant, before any of its rows is read or written. Two inputs that name
the same tenants therefore run one after the other for those tenants — the result is exactly
that of running them one after the other. An input that names more than
:data:`TENANT_LOCKS` tenants takes the ingest lock exclusively instead (the lock table is
finite). Two inputs that meet the same tenants in opposite orders can deadlock; PostgreSQL
aborts one of them, which is then run again from its first line (:func:`ingest_lines` re-opens
or replays its input; :meth:`UsageRecorder.record` keeps its records): nothing is lost, nothing
is counted twice.

Memory stays flat whatever the input: records are written in batches (:data:`BATCH_BYTES` of
lines at most), the id and name caches are dropped when they outgrow :data:`CACHE_KEYS` /
:data:`CACHE_NAMES` (they are only look-up shortcuts; the database is the truth), and the
summary counts distinct tenants, hosts and hours exactly without keeping them all: up to
:data:`DISTINCT_IN_MEMORY` keys of each in a set, past that in a temporary table of the
ingest's own transaction, counted there at the end (:class:`_DistinctKeys`). A file of 2,000
hosts never touches that table; one of two million hosts costs a few extra inserts per batch.
Bad lines are counted, the first :data:`KEEP_ERRORS` kept, and each one handed to the caller's
``on_error`` as it is found, so a caller can keep all of them where it likes.

:func:`ingest_lines` also counts, per tenant, the posts (``host_post`` and ``service_post``) and
the records it accepted, for ``hostmeter ingest``'s per-tenant events: a dict of tenant key →
counts for the first :data:`ITEMISED_TENANTS` tenants of the input (25 MB for keys of 20
characters, 42 MB for keys of 200: the longest); the records of the tenants after those are
counted together, and so are the tenants (the exact distinct count less the itemised ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import reduce
from itertools import islice
from operator import or_
from typing import Any, BinaryIO

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from metering import models as m
from metering.db import bulk_insert, insert_ignore, upsert
from metering.errors import InvalidBatch, InvalidRecord
from metering.records import (
    MAX_LINE_BYTES,
    METRIC_LIST,
    SCHEMA_VERSION,
    AnomalyRole,
    HostPost,
    HostPostWire,
    MonitorChange,
    PlanChange,
    Record,
    RoleMember,
    ServicePost,
    checked_instant,
    checked_metric,
    checked_text,
    parse_line,
)
from metering.timeutil import floor_hour

__all__ = ["BitmapSink", "IngestSummary", "UsageRecorder", "ingest_lines", "merge_bitmaps",
           "read_lines"]

#: ``pg_advisory_xact_lock`` key of ingest on PostgreSQL: every input holds it shared; an input
#: with many tenants, and anything that must exclude every ingest (the bench's clean-up), holds
#: it exclusively.
INGEST_LOCK_KEY = 0x686D5F696E67  # "hm_ing"
TENANT_LOCK_SPACE = 0x686D74  # "hmt": pg_advisory_xact_lock(TENANT_LOCK_SPACE, hashtext(key))
TENANT_LOCKS = 500
"""Tenant locks one input takes before it takes the ingest lock exclusively instead."""
DEADLOCK_RETRIES = 5
"""Times an input aborted by a deadlock with a concurrent ingest is run again."""
_CHUNK = 400  # keys per ``IN (...)`` look-up; well under SQLite's bound-parameter limit
KEEP_ERRORS = 20
"""Bad lines an :class:`IngestSummary` (or :class:`InvalidBatch`) keeps; all are counted."""
CACHE_KEYS = 50_000
"""Tenant ids, host ids and name dictionaries kept in memory, each (a few MB at most)."""
CACHE_NAMES = 400_000
"""Metric names kept in memory over all cached dictionaries."""
DISTINCT_IN_MEMORY = 100_000
"""Distinct tenants, hosts or hours counted in a set before they go to a temporary table."""
BATCH_BYTES = 16 << 20
"""A batch is written when its lines reach this many bytes, even short of ``batch_size``."""
NAMES_PER_WRITE = 5_000
"""New dictionary entries held before they are written."""
COMBO_BYTES = 48 << 20
"""Bytes of distinct (tenant, raw list of names) whose bitmap the fast path remembers (each
costs its list's bytes and about 200 more: some 20,000 lists of a hundred names)."""
FLUSH_KEYS = 10_000
"""Held host-hours written per statement group when the fast path flushes."""
ITEMISED_TENANTS = 100_000
"""Tenants of one input whose posts and records :func:`ingest_lines` counts one by one."""
FAST_KEYS = 200_000
"""Host-hours the fast path accumulates before it writes them (a few tens of MB): posts arrive
minute by minute across the fleet, so holding an hour's keys writes each host-hour once."""


@dataclass(slots=True, kw_only=True)
class IngestSummary:
    """What one ingest did: exact counts of the records and of the distinct tenants, hosts and
    UTC hours they touched, the rows written, and the bad lines (all counted, the first
    :data:`KEEP_ERRORS` kept)."""

    records: int = 0
    rejected: int = 0
    written_rows: int = 0
    tenants: int = 0
    hosts: int = 0
    hours: int = 0
    errors: list[InvalidRecord] = field(default_factory=list)
    per_tenant: dict[str, list[int]] = field(default_factory=dict)
    """``[posts, records]`` accepted per tenant key, in the order the input first names them,
    for its first :data:`ITEMISED_TENANTS` tenants (:func:`ingest_lines` only)."""
    not_itemised: list[int] = field(default_factory=lambda: [0, 0])
    """``[posts, records]`` of the tenants after those, together."""
    tenants_not_itemised: int = 0
    """The tenants after those (``tenants`` less the itemised ones)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "tenants": self.tenants,
            "hosts": self.hosts,
            "hours": self.hours,
            "rows_written": self.written_rows,
            "rejected": self.rejected,
        }


def service_metric_key(service: str, name: str) -> str:
    """The dictionary name of a service metric: service metrics are identified by (service,
    name), so ``req.count`` of service ``web`` and of service ``api`` are two metrics. The
    length prefix keeps the pair unambiguous whatever characters the names hold."""
    return f"{len(service)}:{service}:{name}"


def _bits_to_bytes(bits: int) -> bytes:
    return bits.to_bytes((bits.bit_length() + 7) // 8 or 1, "little")


def _bytes_to_bits(blob: bytes) -> int:
    return int.from_bytes(blob, "little")


_TENANTS, _HOSTS, _HOURS = 1, 2, 3
_seen = sa.Table(
    "hm_ingest_seen",
    sa.MetaData(),  # not the schema's: a scratch table of one transaction, never migrated
    sa.Column("what", sa.SmallInteger, primary_key=True),
    sa.Column("id", sa.BigInteger, primary_key=True),
)


class _DistinctKeys:
    """Exact counts of distinct integer keys of a few kinds (tenant ids, host ids, epoch hours)
    in bounded memory.

    Keys gather in one set per kind; a set that outgrows :data:`DISTINCT_IN_MEMORY` is moved
    into a temporary table (``INSERT … ON CONFLICT DO NOTHING`` on its primary key keeps one
    row per key) and emptied. :meth:`counts` counts what the sets and the table hold together.
    The table lives in the ingest's transaction and is dropped before it commits; a rollback
    removes it as well.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pending: dict[int, set[int]] = {_TENANTS: set(), _HOSTS: set(), _HOURS: set()}
        self.spilled = False

    def add(self, what: int, keys: Iterable[int]) -> None:
        pending = self.pending[what]
        pending.update(keys)
        if len(pending) > DISTINCT_IN_MEMORY:
            self._spill(what)

    def _spill(self, what: int) -> None:
        if not self.spilled:
            self.conn.exec_driver_sql(
                "CREATE TEMPORARY TABLE IF NOT EXISTS hm_ingest_seen (what SMALLINT NOT NULL, "
                "id BIGINT NOT NULL, PRIMARY KEY (what, id))"
            )
            self.conn.execute(sa.delete(_seen))  # a connection's leftover, should there be one
            self.spilled = True
        pending = self.pending[what]
        insert_ignore(self.conn, _seen, [{"what": what, "id": k} for k in pending],
                      key=["what", "id"])
        pending.clear()

    def counts(self) -> dict[int, int]:
        """The number of distinct keys of each kind; drops the temporary table."""
        if not self.spilled:
            return {what: len(keys) for what, keys in self.pending.items()}
        for what in self.pending:
            self._spill(what)
        counted: dict[int, int] = {
            what: n
            for what, n in self.conn.execute(
                sa.select(_seen.c.what, sa.func.count()).group_by(_seen.c.what)
            )
        }
        self.conn.exec_driver_sql("DROP TABLE hm_ingest_seen")
        self.spilled = False
        return {what: counted.get(what, 0) for what in self.pending}


class _Writer:
    """Writes batches of records inside one open transaction, with bounded look-up caches."""

    def __init__(self, conn: Connection, summary: IngestSummary, *,
                 exclusive: bool = False) -> None:
        self.conn = conn
        self.summary = summary
        self.locks = _TenantLocks(conn, exclusive=exclusive)
        self.tenant_ids: dict[str, int] = {}
        self.host_ids: dict[tuple[int, str], int] = {}
        self.ordinals: dict[tuple[int, str], dict[str, int]] = {}
        self.cached_names = 0
        self.new_names: list[dict[str, Any]] = []
        self.distinct = _DistinctKeys(conn)
        # The short way of host posts (see :meth:`post_adder`): checked values, and the posts
        # accumulated per (tenant id, host key, hour) until the next flush.
        self.fast_tenants: dict[str, tuple[int, set[str]]] = {}
        self.fast_hours: dict[str, datetime] = {}
        self.fast_acc: dict[tuple[int, str, datetime], list[Any]] = {}
        self.checked_hosts = 0

    def finish(self) -> None:
        """Write what is still held, and put the distinct counts into the summary (call once,
        before the commit)."""
        self.write_names()
        counts = self.distinct.counts()
        self.summary.tenants = counts[_TENANTS]
        self.summary.hosts = counts[_HOSTS]
        self.summary.hours = counts[_HOURS]

    # -- key resolution ---------------------------------------------------------------------

    def _tenant_ids(self, keys: set[str]) -> None:
        missing = [k for k in keys if k not in self.tenant_ids]
        if not missing:
            return
        if len(self.tenant_ids) + len(missing) > CACHE_KEYS:
            self.tenant_ids.clear()  # a cache, not the truth: look this batch's keys up again
            missing = list(keys)
        self.locks.take(missing)  # before any row of these tenants is read or written
        insert_ignore(self.conn, m.tenants, [{"key": k} for k in missing], key=["key"])
        for i in range(0, len(missing), _CHUNK):
            part = missing[i : i + _CHUNK]
            rows = self.conn.execute(
                sa.select(m.tenants.c.key, m.tenants.c.id).where(m.tenants.c.key.in_(part))
            )
            self.tenant_ids.update({k: v for k, v in rows})

    def _host_ids(self, keys: set[tuple[int, str]]) -> None:
        missing = [k for k in keys if k not in self.host_ids]
        if not missing:
            return
        if len(self.host_ids) + len(missing) > CACHE_KEYS:
            self.host_ids.clear()
            missing = list(keys)
        insert_ignore(
            self.conn,
            m.hosts,
            [{"tenant_id": t, "key": h} for t, h in missing],
            key=["tenant_id", "key"],
        )
        h = m.hosts
        rows = _by_leading_key(self.conn, [h.c.tenant_id, h.c.key, h.c.id], h.c.tenant_id,
                               h.c.key, ((k, t) for t, k in missing))
        self.host_ids.update({(t, k): i for t, k, i in rows})

    def _dictionary(self, tenant_id: int, namespace: str) -> dict[str, int]:
        """The tenant's dictionary of ``namespace``: each name → its ordinal. Ordinals are
        dense, so the next one is the dictionary's size."""
        key = (tenant_id, namespace)
        names = self.ordinals.get(key)
        if names is None:
            if self.cached_names > CACHE_NAMES or len(self.ordinals) > CACHE_KEYS:
                self._evict_dictionaries()
            rows = self.conn.execute(
                sa.select(m.metric_names.c.name, m.metric_names.c.ordinal).where(
                    m.metric_names.c.tenant_id == tenant_id,
                    m.metric_names.c.namespace == namespace,
                )
            )
            names = self.ordinals[key] = {n: o for n, o in rows}
            self.cached_names += len(names)
        return names

    def _bits(self, tenant_id: int, namespace: str, metrics: Iterable[str]) -> int:
        names = self._dictionary(tenant_id, namespace)
        bits = 0
        new: list[dict[str, Any]] = []
        for name in metrics:
            ordinal = names.get(name)
            if ordinal is None:
                ordinal = names[name] = len(names)
                self.cached_names += 1
                new.append(
                    {"tenant_id": tenant_id, "namespace": namespace, "name": name,
                     "ordinal": ordinal}
                )
            bits |= 1 << ordinal
        if new:
            self.new_names.extend(new)
            if len(self.new_names) >= NAMES_PER_WRITE:
                self.write_names()
        return bits

    def write_names(self) -> None:
        """Write the dictionary entries numbered since the last call, in one batch (a post
        that brings a new name costs no statement of its own). Called before any row
        that uses them is written, and before the commit."""
        if self.new_names:
            bulk_insert(self.conn, m.metric_names, self.new_names)
            self.new_names = []

    # -- the fast path of host posts ------------------------------------------------------------

    def _evict_dictionaries(self) -> None:
        """Drop the older half of the cached dictionaries (they are reloaded on demand, new
        ordinals included). Dropping them all at once made an input whose tenants' names
        outgrow the cache reload every dictionary again and again."""
        self.write_names()  # the entries numbered so far go with the dictionaries they extend
        keep = CACHE_NAMES // 2
        for key in list(self.ordinals):
            if self.cached_names <= keep and len(self.ordinals) <= CACHE_KEYS // 2:
                break
            self.cached_names -= len(self.ordinals.pop(key))

    def _fast_tenant(self, key: str) -> tuple[int, set[str]] | None:
        if not checked_text("tenant", key):
            return None
        if len(self.fast_tenants) > CACHE_KEYS:
            self.fast_tenants.clear()
            self.checked_hosts = 0
        self._tenant_ids({key})
        state = self.fast_tenants[key] = (self.tenant_ids[key], set())
        return state

    def _fast_bits(self, tenant_id: int, raw: bytes) -> int | None:
        """The bitmap of a post's raw ``metrics``: decoded, every name new to the tenant checked
        (``None``: the list or a name does not pass; the slow path says why) and numbered."""
        try:
            metrics = METRIC_LIST.decode(raw)
        except msgspec.MsgspecError:
            return None
        names = self._dictionary(tenant_id, "host")
        try:
            return reduce(or_, map((1).__lshift__, map(names.__getitem__, metrics)), 0)
        except KeyError:  # names new to the tenant
            if not all(name in names or checked_metric(name) for name in metrics):
                return None
            return self._bits(tenant_id, "host", metrics)

    def post_adder(self) -> Callable[[HostPostWire], bool]:
        """``add(post)``: accumulate one decoded ``host_post`` whose values pass the same checks
        as :func:`~metering.records.parse_record` (each distinct tenant, host and instant is
        checked once; each metric name once, when it first enters the tenant's dictionary).
        ``False``: a value does not pass and nothing was recorded; the slow path says why.

        A closure over the caches rather than a method: this runs for nearly every line, and
        local names are what keeps it near the cost of decoding the line."""
        tenants, hours, acc = self.fast_tenants, self.fast_hours, self.fast_acc
        version = SCHEMA_VERSION
        combos: dict[tuple[int, bytes], int] = {}
        held_bytes = 0

        def add(post: HostPostWire) -> bool:
            nonlocal held_bytes
            if post.v != version:
                return False
            state = tenants.get(post.tenant)
            if state is None:
                state = self._fast_tenant(post.tenant)
                if state is None:
                    return False
            tenant_id, hosts = state
            host = post.host
            if host not in hosts and not self._fast_host(hosts, host):
                return False
            hour = hours.get(post.at)
            if hour is None:
                hour = self._fast_hour(post.at)
                if hour is None:
                    return False
            # An agent posts the same names minute after minute: the bitmap of a list of names,
            # as raw bytes, is computed once per tenant (decoding a hundred strings, hashing
            # them and OR-ing a hundred wide integers is what a line would otherwise cost).
            raw = (tenant_id, bytes(post.metrics))
            bits = combos.get(raw)
            if bits is None:
                bits = self._fast_bits(tenant_id, raw[1])
                if bits is None:
                    return False
                held_bytes += len(raw[1]) + 200
                if held_bytes > COMBO_BYTES:
                    combos.clear()
                    held_bytes = len(raw[1]) + 200
                combos[raw] = bits
            key = (tenant_id, host, hour)
            held = acc.get(key)
            if held is None:
                acc[key] = [post.kind == "standard", bits]
            else:
                if post.kind == "standard":
                    held[0] = True
                held[1] |= bits
            return True

        return add

    def _fast_host(self, hosts: set[str], host: str) -> bool:
        if not checked_text("host", host):
            return False
        if self.checked_hosts > CACHE_KEYS:
            for _, checked in self.fast_tenants.values():
                checked.clear()
            self.checked_hosts = 0
        hosts.add(host)
        self.checked_hosts += 1
        return True

    def _fast_hour(self, text: str) -> datetime | None:
        at = checked_instant(text)
        if at is None:
            return None
        if len(self.fast_hours) > CACHE_KEYS:
            self.fast_hours.clear()
        hour = self.fast_hours[text] = floor_hour(at)
        return hour

    def flush_posts(self) -> None:
        """Write the accumulated fast-path posts (one row per host-hour), :data:`FLUSH_KEYS`
        host-hours at a time, so that the ids, rows and parameters of a write stay small
        however many host-hours are held."""
        if not self.fast_acc:
            return
        items = iter(self.fast_acc.items())
        while chunk := list(islice(items, FLUSH_KEYS)):
            self._host_ids({(t, h) for (t, h, _), _ in chunk})
            host_acc: dict[tuple[int, datetime], list[Any]] = {
                (self.host_ids[(t, h)], hour): [t, standard, bits]
                for (t, h, hour), (standard, bits) in chunk
            }
            del chunk
            self.distinct.add(_TENANTS, {t for t, _, _ in host_acc.values()})
            self.distinct.add(_HOSTS, {h for h, _ in host_acc})
            self.distinct.add(_HOURS, {int(hour.timestamp()) // 3600 for _, hour in host_acc})
            self._merge_host_hours(host_acc)
        self.fast_acc.clear()  # the same dict: post_adder's closure holds it

    # -- writing ----------------------------------------------------------------------------

    def write(self, batch: list[Record]) -> None:
        if not batch:
            return
        tenant_keys = {r.tenant for r in batch}
        self._tenant_ids(tenant_keys)
        host_keys = {
            (self.tenant_ids[r.tenant], r.host)
            for r in batch
            if isinstance(r, HostPost | RoleMember)
        }
        self._host_ids(host_keys)

        host_acc: dict[tuple[int, datetime], list[Any]] = {}
        service_acc: dict[tuple[int, datetime], int] = {}
        plans: dict[tuple[int, datetime], str] = {}
        monitors: set[tuple[int, str, datetime, bool]] = set()
        roles: set[tuple[int, str, datetime, bool]] = set()
        members: set[tuple[int, str, int, datetime, bool]] = set()

        for r in batch:
            t = self.tenant_ids[r.tenant]
            if isinstance(r, HostPost):
                key = (self.host_ids[(t, r.host)], floor_hour(r.at))
                acc = host_acc.get(key)
                bits = self._bits(t, "host", r.metrics)
                if acc is None:
                    host_acc[key] = [t, r.kind == "standard", bits]
                else:
                    acc[1] = acc[1] or r.kind == "standard"
                    acc[2] |= bits
            elif isinstance(r, ServicePost):
                skey = (t, floor_hour(r.at))
                names = tuple(service_metric_key(r.service, n) for n in r.metrics)
                service_acc[skey] = service_acc.get(skey, 0) | self._bits(t, "service", names)
            elif isinstance(r, PlanChange):
                plans[(t, r.at)] = r.plan
            elif isinstance(r, MonitorChange):
                monitors.add((t, r.monitor, r.at, r.present))
            elif isinstance(r, AnomalyRole):
                roles.add((t, r.role, r.at, r.enabled))
            elif isinstance(r, RoleMember):
                members.add((t, r.role, self.host_ids[(t, r.host)], r.at, r.member))

        s = self.summary
        self.distinct.add(_TENANTS, (self.tenant_ids[k] for k in tenant_keys))
        self.distinct.add(_HOSTS, (self.host_ids[k] for k in host_keys))
        hours = {hour for _, hour in host_acc} | {hour for _, hour in service_acc}
        self.distinct.add(_HOURS, (int(hour.timestamp()) // 3600 for hour in hours))

        self._merge_host_hours(host_acc)
        self._merge_service_hours(service_acc)
        s.written_rows += upsert(
            self.conn,
            m.plan_changes,
            [{"tenant_id": t, "at": at, "plan": p} for (t, at), p in plans.items()],
            key=["tenant_id", "at"],
            update=["plan"],
            only_if_changed=True,
        )
        s.written_rows += insert_ignore(
            self.conn,
            m.monitor_events,
            [{"tenant_id": t, "monitor": k, "at": at, "present": v} for t, k, at, v in monitors],
            key=["tenant_id", "monitor", "at", "present"],
        )
        s.written_rows += insert_ignore(
            self.conn,
            m.role_events,
            [{"tenant_id": t, "role": k, "at": at, "enabled": v} for t, k, at, v in roles],
            key=["tenant_id", "role", "at", "enabled"],
        )
        s.written_rows += insert_ignore(
            self.conn,
            m.role_member_events,
            [
                {"tenant_id": t, "role": k, "host_id": h, "at": at, "member": v}
                for t, k, h, at, v in members
            ],
            key=["tenant_id", "role", "host_id", "at", "member"],
        )

    def _merge_host_hours(self, acc: dict[tuple[int, datetime], list[Any]]) -> None:
        if not acc:
            return
        t = m.host_hours
        existing: dict[tuple[int, datetime], tuple[str, bytes]] = {
            (h, hr): (k, b)
            for h, hr, k, b in _by_leading_key(
                self.conn, [t.c.host_id, t.c.hour, t.c.kind, t.c.metric_bits],
                t.c.hour, t.c.host_id, acc,
            )
        }
        out = []
        for (host_id, hour), (tenant_id, standard, bits) in acc.items():
            old = existing.get((host_id, hour))
            if old is not None:
                old_kind, old_blob = old
                old_bits = _bytes_to_bits(old_blob)
                standard = standard or old_kind == "standard"
                if old_bits | bits == old_bits and (old_kind == "standard") == standard:
                    continue
                bits |= old_bits
            out.append(
                {
                    "host_id": host_id,
                    "hour": hour,
                    "tenant_id": tenant_id,
                    "kind": "standard" if standard else "micro",
                    "metric_count": bits.bit_count(),
                    "metric_bits": _bits_to_bytes(bits),
                }
            )
        upsert(
            self.conn, t, out, key=["host_id", "hour"],
            update=["kind", "metric_count", "metric_bits"],
        )
        self.summary.written_rows += len(out)

    def _merge_service_hours(self, acc: dict[tuple[int, datetime], int]) -> None:
        if not acc:
            return
        t = m.service_hours
        existing: dict[tuple[int, datetime], int] = {
            (tn, hr): _bytes_to_bits(b)
            for tn, hr, b in _by_leading_key(
                self.conn, [t.c.tenant_id, t.c.hour, t.c.metric_bits],
                t.c.tenant_id, t.c.hour, ((hr, tn) for tn, hr in acc),
            )
        }
        out = []
        for key, bits in acc.items():
            old = existing.get(key)
            if old is not None:
                if old | bits == old:
                    continue
                bits |= old
            out.append(
                {"tenant_id": key[0], "hour": key[1], "metric_count": bits.bit_count(),
                 "metric_bits": _bits_to_bytes(bits)}
            )
        upsert(self.conn, t, out, key=["tenant_id", "hour"], update=["metric_count", "metric_bits"])
        self.summary.written_rows += len(out)


def _by_leading_key(
    conn: Connection,
    columns: list[sa.ColumnElement[Any]],
    group_col: sa.ColumnElement[Any],
    member_col: sa.ColumnElement[Any],
    keys: Iterable[tuple[Any, Any]],
) -> Iterator[Any]:
    """Rows whose (``member_col``, ``group_col``) is in ``keys``, looked up as
    ``group_col = ? AND member_col IN (…)`` per group value.

    A row-value ``IN`` over two columns makes SQLite scan the whole table; this shape uses the
    primary-key index on both backends.
    """
    groups: dict[Any, list[Any]] = {}
    for member, group in keys:
        groups.setdefault(group, []).append(member)
    for group, members in groups.items():
        for i in range(0, len(members), _CHUNK):
            yield from conn.execute(
                sa.select(*columns).where(group_col == group,
                                          member_col.in_(members[i : i + _CHUNK]))
            )


def _write_full_batches(writer: _Writer, records: Iterable[tuple[Record, int]],
                        batch_size: int) -> list[Record]:
    """Stream ``(record, size of its line)`` pairs into ``writer`` in batches of ``batch_size``
    records or :data:`BATCH_BYTES` bytes of lines, whichever comes first, counting them;
    returns the last, partial batch for the caller to write (or to drop, when the input is
    rejected)."""
    batch: list[Record] = []
    size = 0
    for rec, n in records:
        writer.summary.records += 1
        batch.append(rec)
        size += n
        if len(batch) >= batch_size or size >= BATCH_BYTES:
            writer.write(batch)
            batch = []
            size = 0
    return batch


class _TenantLocks:
    """The locks of one input's transaction on PostgreSQL (nothing on SQLite, whose
    ``BEGIN IMMEDIATE`` already admits one writer): the ingest lock shared, then one advisory
    lock per tenant key, in sorted order within each call; past :data:`TENANT_LOCKS` tenants,
    the ingest lock exclusively (a transaction may take a stronger lock on a key it holds)."""

    def __init__(self, conn: Connection, *, exclusive: bool = False) -> None:
        self.conn = conn
        self.active = conn.dialect.name == "postgresql"
        self.exclusive = exclusive
        self.held: set[str] = set()
        if self.active:
            fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
            conn.execute(sa.text(f"SELECT {fn}(:k)"), {"k": INGEST_LOCK_KEY})

    def take(self, keys: Iterable[str]) -> None:
        if not self.active or self.exclusive:
            return
        new = sorted(set(keys) - self.held)
        if not new:
            return
        if len(self.held) + len(new) > TENANT_LOCKS:
            self.conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"),
                              {"k": INGEST_LOCK_KEY})
            self.exclusive = True
            return
        # unnest keeps the array's (sorted) order, so every input locks tenants in one order.
        self.conn.execute(
            sa.text("SELECT count(pg_advisory_xact_lock(:space, hashtext(k))) "
                    "FROM unnest(CAST(:keys AS text[])) AS k"),
            {"space": TENANT_LOCK_SPACE, "keys": new},
        )
        self.held.update(new)


def _deadlocked(exc: BaseException) -> bool:
    """``exc`` is PostgreSQL aborting this transaction to break a deadlock (SQLSTATE 40P01)."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) == "40P01"


class _Replay:
    """An input that can be read again from its first line: the lines read so far are kept in
    an anonymous temporary file as they pass (in memory up to a few MB), so a run aborted by a
    deadlock replays them and then reads on. For inputs nobody can re-open (standard input,
    a generator)."""

    def __init__(self, lines: Iterable[str | bytes]) -> None:
        import tempfile

        self.source = iter(lines)
        self.file = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # noqa: SIM115 (closed by close())
        self.end = 0

    def __iter__(self) -> Iterator[str | bytes]:
        f = self.file
        f.seek(0)
        while f.tell() < self.end:
            head = f.read(5)
            n = int.from_bytes(head[1:], "little")
            data = f.read(n)
            yield data if head[0] else data.decode("utf-8", "surrogatepass")
        for line in self.source:
            raw = line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")
            f.seek(self.end)
            f.write(bytes([isinstance(line, bytes)]) + len(raw).to_bytes(4, "little") + raw)
            self.end = f.tell()
            yield line

    def close(self) -> None:
        self.file.close()


class UsageRecorder:
    """Records usage into the database: the Python API of the metric-post path.

    >>> recorder = UsageRecorder(engine)
    >>> recorder.post_host_metrics(tenant="acme", host="h-1", kind="standard",
    ...                            at=datetime(2026, 10, 15, 10, 3, tzinfo=UTC),
    ...                            metrics=["loadavg5", "cpu.user"])

    Every call is one transaction: either all its records are recorded or none is. Plan records
    are keyed by (tenant, instant): a later record for the same instant replaces the plan (last
    write wins, in input order and across loads).
    """

    def __init__(self, engine: Engine, *, batch_size: int = 5000) -> None:
        self.engine = engine
        self.batch_size = batch_size

    def record(self, records: Iterable[Record]) -> IngestSummary:
        """Record validated records in one transaction; returns what was touched."""
        if self.engine.dialect.name == "postgresql":
            records = list(records)  # kept, to run again if a deadlock aborts the first run
        return _run(self.engine, lambda writer, _attempt: writer.write(
            _write_full_batches(writer, ((r, 0) for r in records), self.batch_size)))

    def post_host_metrics(
        self, *, tenant: str, host: str, kind: str, at: datetime, metrics: Iterable[str]
    ) -> IngestSummary:
        """Record one agent post (validated exactly as an ingest line would be)."""
        from metering.records import parse_record

        rec = parse_record(
            {"type": "host_post", "tenant": tenant, "host": host, "kind": kind,
             "at": at.isoformat(), "metrics": list(metrics)}
        )
        return self.record([rec])


def read_lines(stream: BinaryIO, *, limit: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The lines of a binary stream, each cut to ``limit + 1`` bytes at most.

    A longer line is yielded as its first ``limit + 1`` bytes, which
    :func:`~metering.records.parse_line` rejects as too long, and the rest of it is read and
    dropped in pieces: a file that is one gigabyte-long line costs no more memory than a short
    one.
    """
    readline = stream.readline
    while raw := readline(limit + 1):
        if len(raw) > limit and not raw.endswith(b"\n"):
            while (rest := readline(1 << 16)) and not rest.endswith(b"\n"):
                pass
        yield raw


def _without_bom(text: str | bytes) -> str | bytes:
    if isinstance(text, bytes):
        return text[3:] if text.startswith(b"\xef\xbb\xbf") else text
    return text[1:] if text.startswith("\ufeff") else text


def ingest_lines(
    engine: Engine,
    lines: Iterable[str | bytes],
    *,
    skip_invalid: bool = False,
    batch_size: int = 5000,
    hold_keys: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_error: Callable[[InvalidRecord], None] | None = None,
    reopen: Callable[[], Iterable[str | bytes]] | None = None,
    itemise: int = ITEMISED_TENANTS,
) -> IngestSummary:
    """Parse and record JSON Lines in one transaction, streaming in batches.

    Without ``skip_invalid`` a single malformed line rejects the whole input: the remaining
    lines are still parsed (so that every problem is reported at once), nothing is written, and
    :class:`InvalidBatch` is raised. With ``skip_invalid`` exactly the good lines are recorded
    and the bad ones are counted in the summary. Either way the first :data:`KEEP_ERRORS` bad
    lines are kept and every one of them is passed to ``on_error`` as it is found (to report
    them all without holding them all). A UTF-8 byte order mark at the start of the first line
    is dropped.

    Host posts take a fast path: decoded straight into their wire shape (msgspec, in C), each
    distinct value checked once, each distinct list of names (its raw bytes) decoded and turned
    into its bitmap through the tenant's dictionary once (see :data:`COMBO_BYTES`), and accumulated
    per host-hour — up to ``hold_keys`` of them
    (default :data:`FAST_KEYS`) — before they are written. Other records are written every
    ``batch_size`` records.

    On PostgreSQL an input that a concurrent ingest deadlocks with (see the module's docstring)
    is run again from its first line: ``reopen()`` gives the input afresh (a file is opened
    again); without it the lines read so far are kept in a temporary file as they pass and
    replayed. ``on_error`` hears of each bad line once, however many runs it takes.

    The summary counts the posts and records it accepted per tenant for the first ``itemise``
    tenants of the input (:attr:`IngestSummary.per_tenant`), and those of the rest together.
    """
    replay: _Replay | None = None
    if engine.dialect.name == "postgresql" and reopen is None:
        replay = _Replay(lines)
        lines = replay
    reported = 0

    def report_once(exc: InvalidRecord) -> None:
        nonlocal reported
        if on_error is not None and (exc.line or 0) > reported:
            reported = exc.line or 0
            on_error(exc)

    hold = FAST_KEYS if hold_keys is None else hold_keys

    def read(writer: _Writer, attempt: int) -> None:
        source = reopen() if attempt and reopen is not None else lines
        _read_into(writer, source, skip_invalid=skip_invalid, batch_size=batch_size, hold=hold,
                   on_progress=on_progress, on_error=report_once, itemise=itemise)

    try:
        summary = _run(engine, read)
        summary.tenants_not_itemised = summary.tenants - len(summary.per_tenant)
        return summary
    finally:
        if replay is not None:
            replay.close()


def _run(engine: Engine, work: Callable[[_Writer, int], None]) -> IngestSummary:
    """``work(writer, attempt)`` in one transaction, then the writer's last writes. On
    PostgreSQL a run that a deadlock aborts is run again (up to :data:`DEADLOCK_RETRIES`
    times), holding the ingest lock exclusively from the start if the aborted run had to."""
    exclusive = False
    for attempt in range(DEADLOCK_RETRIES + 1):
        summary = IngestSummary()
        writer: _Writer | None = None
        try:
            with engine.begin() as conn:
                writer = _Writer(conn, summary, exclusive=exclusive)
                work(writer, attempt)
                writer.finish()
            return summary
        except sa.exc.DBAPIError as exc:
            if not _deadlocked(exc) or attempt == DEADLOCK_RETRIES:
                raise
            exclusive = writer is not None and writer.locks.exclusive
    raise AssertionError("unreachable")


class BitmapSink:
    """What ``flush-usage`` writes through: the writer of one ingest transaction, fed whole
    host-hours and tenant-hours of metric names (from the post-time hot path) instead of posts.
    The same locks, dictionaries and bit-OR merge as a JSON Lines ingest; see
    :func:`merge_bitmaps`."""

    def __init__(self, writer: _Writer) -> None:
        self._writer = writer
        self._services: dict[tuple[int, datetime], int] = {}

    @property
    def summary(self) -> IngestSummary:
        return self._writer.summary

    def tenant_id(self, key: str) -> int:
        """The tenant's id (created if new; on PostgreSQL its ingest lock is taken first)."""
        w = self._writer
        if key not in w.tenant_ids:
            w._tenant_ids({key})
        return w.tenant_ids[key]

    def bits(self, tenant_id: int, namespace: str, names: Iterable[str]) -> int:
        """The bitmap of ``names`` (already checked) in the tenant's ``namespace`` dictionary,
        numbering the names new to it."""
        return self._writer._bits(tenant_id, namespace, names)

    def add_host(self, tenant_id: int, host: str, hour: datetime, standard: bool,
                 bits: int) -> None:
        acc = self._writer.fast_acc
        key = (tenant_id, host, hour)
        held = acc.get(key)
        if held is None:
            acc[key] = [standard, bits]
        else:
            held[0] = held[0] or standard
            held[1] |= bits
        if len(acc) >= FLUSH_KEYS:
            self._writer.flush_posts()

    def add_service(self, tenant_id: int, hour: datetime, bits: int) -> None:
        key = (tenant_id, hour)
        self._services[key] = self._services.get(key, 0) | bits
        if len(self._services) >= FLUSH_KEYS:
            self._flush_services()

    def _flush_services(self) -> None:
        w, acc = self._writer, self._services
        if acc:
            w.distinct.add(_TENANTS, {t for t, _ in acc})
            w.distinct.add(_HOURS, {int(hour.timestamp()) // 3600 for _, hour in acc})
            w._merge_service_hours(acc)
            self._services = {}

    def flush(self) -> None:
        """Write everything added so far (called by :func:`merge_bitmaps` at the end)."""
        self._writer.flush_posts()
        self._flush_services()


def merge_bitmaps(engine: Engine, work: Callable[[BitmapSink, int], None]) -> IngestSummary:
    """``work(sink, attempt)`` in one ingest transaction, then everything it added written and
    committed. On PostgreSQL a run aborted by a deadlock with a concurrent ingest is run again
    (``attempt`` counts), so ``work`` must be able to start over."""

    def run(writer: _Writer, attempt: int) -> None:
        sink = BitmapSink(writer)
        work(sink, attempt)
        sink.flush()

    return _run(engine, run)


def _read_into(
    writer: _Writer,
    lines: Iterable[str | bytes],
    *,
    skip_invalid: bool,
    batch_size: int,
    hold: int,
    on_progress: Callable[[int], None] | None,
    on_error: Callable[[InvalidRecord], None],
    itemise: int,
) -> None:
    """Parse ``lines`` into ``writer`` (one run of :func:`ingest_lines`): host posts the short
    way, held per host-hour up to ``hold`` of them; every other record the full way, written
    in batches. Raises :class:`InvalidBatch` when a line is bad and ``skip_invalid`` is off.
    Each accepted record is counted for its tenant (the first ``itemise`` tenants)."""
    summary = writer.summary
    valid = 0
    decode = msgspec.json.Decoder(HostPostWire).decode
    DecodeError = msgspec.DecodeError
    add_post = writer.post_adder()
    held = writer.fast_acc
    per_tenant, rest = summary.per_tenant, summary.not_itemised

    def new_tenant(key: str) -> list[int]:
        """The counts of a tenant the input names for the first time: its own, or the rest's."""
        if len(per_tenant) >= itemise:
            return rest
        counts = per_tenant[key] = [0, 0]
        return counts

    def other_records() -> Iterator[tuple[Record, int]]:
        nonlocal valid
        for lineno, text in enumerate(lines, start=1):
            if on_progress is not None:
                on_progress(lineno)
            if lineno == 1:
                text = _without_bom(text)
            # The short way: a host post that decodes to its wire shape and whose values pass
            # (nearly every line). Anything else takes the full parser, which accepts it or
            # says exactly what is wrong with it.
            if (not summary.rejected or skip_invalid) and len(text) <= MAX_LINE_BYTES:
                try:
                    post = decode(text)
                except DecodeError:
                    post = None
                if post is not None and add_post(post):
                    valid += 1
                    summary.records += 1
                    counts = per_tenant.get(post.tenant) or new_tenant(post.tenant)
                    counts[0] += 1
                    counts[1] += 1
                    if len(held) >= hold:
                        writer.flush_posts()
                    continue
            try:
                rec = parse_line(text, line=lineno)
            except InvalidRecord as exc:
                summary.rejected += 1
                if len(summary.errors) < KEEP_ERRORS:
                    summary.errors.append(exc)
                on_error(exc)
                continue
            if rec is None:
                continue
            valid += 1
            if summary.rejected and not skip_invalid:
                continue  # keep validating, stop writing: the transaction will roll back
            counts = per_tenant.get(rec.tenant) or new_tenant(rec.tenant)
            counts[0] += isinstance(rec, HostPost | ServicePost)
            counts[1] += 1
            yield rec, len(text)

    batch = _write_full_batches(writer, other_records(), batch_size)
    if summary.rejected and not skip_invalid:
        raise InvalidBatch(
            f"{summary.rejected} invalid record(s); nothing was written "
            "(fix them, or load the good lines with --skip-invalid)",
            errors=summary.errors,
            count=summary.rejected,
            records=valid,
        )
    writer.write(batch)
    writer.flush_posts()
