"""Recording usage: the ingest repository.

:class:`UsageRecorder` is the one writer. ``hostmeter ingest`` feeds it JSON Lines; the SaaS's
metric-post path calls :meth:`UsageRecorder.record` (or :meth:`UsageRecorder.post_host_metrics`)
with records it built itself. Both end in the same SQL.

Exactness without a row per post: every distinct metric name gets a dense per-tenant ordinal
(``metric_names``), and each (host, hour) keeps the bitmap of ordinals it posted. A new post ORs
its bits into the bitmap; ``metric_count`` is the bitmap's population count. Loading the same
post again ORs in bits that are already set and writes nothing.

Writers are serialised (PostgreSQL: a transaction-scoped advisory lock; SQLite: ``BEGIN
IMMEDIATE``), so the read-merge-write of a bitmap and the assignment of new ordinals never race.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from metering import models as m
from metering.db import insert_ignore, upsert
from metering.errors import InvalidBatch, InvalidRecord
from metering.records import (
    AnomalyRole,
    HostPost,
    MonitorChange,
    PlanChange,
    Record,
    RoleMember,
    ServicePost,
    parse_line,
)
from metering.timeutil import floor_hour

__all__ = ["IngestSummary", "UsageRecorder", "ingest_lines"]

#: ``pg_advisory_xact_lock`` key that serialises ingest writers on PostgreSQL.
INGEST_LOCK_KEY = 0x686D5F696E67  # "hm_ing"
_CHUNK = 400  # keys per ``IN (...)`` look-up; well under SQLite's bound-parameter limit
KEEP_ERRORS = 20


@dataclass(slots=True, kw_only=True)
class IngestSummary:
    """What one ingest did (or, when rejected, would have done)."""

    records: int = 0
    rejected: int = 0
    written_rows: int = 0
    tenants: set[str] = field(default_factory=set)
    hosts: set[tuple[str, str]] = field(default_factory=set)
    hours: set[datetime] = field(default_factory=set)
    errors: list[InvalidRecord] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "tenants": len(self.tenants),
            "hosts": len(self.hosts),
            "hours": len(self.hours),
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


class _Writer:
    """Writes batches of records inside one open transaction, with look-up caches."""

    def __init__(self, conn: Connection, summary: IngestSummary) -> None:
        self.conn = conn
        self.summary = summary
        self.tenant_ids: dict[str, int] = {}
        self.host_ids: dict[tuple[int, str], int] = {}
        self.ordinals: dict[tuple[int, str], dict[str, int]] = {}

    # -- key resolution ---------------------------------------------------------------------

    def _tenant_ids(self, keys: set[str]) -> None:
        missing = [k for k in keys if k not in self.tenant_ids]
        if not missing:
            return
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
        key = (tenant_id, namespace)
        names = self.ordinals.get(key)
        if names is None:
            rows = self.conn.execute(
                sa.select(m.metric_names.c.name, m.metric_names.c.ordinal).where(
                    m.metric_names.c.tenant_id == tenant_id,
                    m.metric_names.c.namespace == namespace,
                )
            )
            names = self.ordinals[key] = {n: o for n, o in rows}
        return names

    def _bits(self, tenant_id: int, namespace: str, metrics: tuple[str, ...]) -> int:
        names = self._dictionary(tenant_id, namespace)
        bits = 0
        new: list[dict[str, Any]] = []
        for name in metrics:
            ordinal = names.get(name)
            if ordinal is None:
                ordinal = names[name] = len(names)
                new.append(
                    {"tenant_id": tenant_id, "namespace": namespace, "name": name,
                     "ordinal": ordinal}
                )
            bits |= 1 << ordinal
        if new:
            self.conn.execute(sa.insert(m.metric_names), new)
        return bits

    # -- writing ----------------------------------------------------------------------------

    def write(self, batch: list[Record]) -> None:
        if not batch:
            return
        s = self.summary
        self._tenant_ids({r.tenant for r in batch})
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
            s.tenants.add(r.tenant)
            if isinstance(r, HostPost):
                hour = floor_hour(r.at)
                s.hours.add(hour)
                s.hosts.add((r.tenant, r.host))
                key = (self.host_ids[(t, r.host)], hour)
                acc = host_acc.get(key)
                bits = self._bits(t, "host", r.metrics)
                if acc is None:
                    host_acc[key] = [t, r.kind == "standard", bits]
                else:
                    acc[1] = acc[1] or r.kind == "standard"
                    acc[2] |= bits
            elif isinstance(r, ServicePost):
                hour = floor_hour(r.at)
                s.hours.add(hour)
                skey = (t, hour)
                names = tuple(service_metric_key(r.service, n) for n in r.metrics)
                service_acc[skey] = service_acc.get(skey, 0) | self._bits(t, "service", names)
            elif isinstance(r, PlanChange):
                plans[(t, r.at)] = r.plan
            elif isinstance(r, MonitorChange):
                monitors.add((t, r.monitor, r.at, r.present))
            elif isinstance(r, AnomalyRole):
                roles.add((t, r.role, r.at, r.enabled))
            elif isinstance(r, RoleMember):
                s.hosts.add((r.tenant, r.host))
                members.add((t, r.role, self.host_ids[(t, r.host)], r.at, r.member))

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


def _write_full_batches(writer: _Writer, records: Iterable[Record],
                        batch_size: int) -> list[Record]:
    """Stream ``records`` into ``writer`` ``batch_size`` at a time, counting them; returns the
    last, partial batch for the caller to write (or to drop, when the input is rejected)."""
    batch: list[Record] = []
    for rec in records:
        writer.summary.records += 1
        batch.append(rec)
        if len(batch) >= batch_size:
            writer.write(batch)
            batch = []
    return batch


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": INGEST_LOCK_KEY})


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
        summary = IngestSummary()
        with self.engine.begin() as conn:
            _lock(conn)
            writer = _Writer(conn, summary)
            writer.write(_write_full_batches(writer, records, self.batch_size))
        return summary

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


def ingest_lines(
    engine: Engine,
    lines: Iterable[str | bytes],
    *,
    skip_invalid: bool = False,
    batch_size: int = 5000,
    on_progress: Callable[[int], None] | None = None,
) -> IngestSummary:
    """Parse and record JSON Lines in one transaction, streaming in batches.

    Without ``skip_invalid`` a single malformed line rejects the whole input: the remaining
    lines are still parsed (so that every problem is reported at once), nothing is written, and
    :class:`InvalidBatch` is raised. With ``skip_invalid`` the good lines are recorded and the
    bad ones are counted in the summary (the first :data:`KEEP_ERRORS` are kept).
    """
    summary = IngestSummary()

    def good_records() -> Iterator[Record]:
        for lineno, text in enumerate(lines, start=1):
            if on_progress is not None:
                on_progress(lineno)
            try:
                rec = parse_line(text, line=lineno)
            except InvalidRecord as exc:
                summary.rejected += 1
                if len(summary.errors) < KEEP_ERRORS:
                    summary.errors.append(exc)
                continue
            if rec is None:
                continue
            if summary.rejected and not skip_invalid:
                continue  # keep validating, stop writing: the transaction will roll back
            yield rec

    with engine.begin() as conn:
        _lock(conn)
        writer = _Writer(conn, summary)
        batch = _write_full_batches(writer, good_records(), batch_size)
        if summary.rejected and not skip_invalid:
            raise InvalidBatch(
                f"{summary.rejected} invalid record(s); nothing was written "
                "(fix them, or load the good lines with --skip-invalid)",
                errors=summary.errors,
                count=summary.rejected,
            )
        writer.write(batch)
    return summary
