"""Monthly partitions of the tables that grow every hour (PostgreSQL only).

On PostgreSQL ``host_hours``, ``service_hours`` and ``usage_snapshots`` are partitioned by
``RANGE (hour)`` (migration 0010), one partition per **UTC** calendar month, named
``<table>_pYYYY_MM`` and bounded ``[YYYY-MM-01 00:00Z, next month 00:00Z)``. ``hour`` is a
``timestamptz``, so the bounds are instants and a UTC month is the same interval whatever the
session's ``TimeZone``; billing months (``HOSTMETER_BILLING_TZ``) are not used because the
partitioning must not change when that setting does. Each table also has a DEFAULT partition
(``<table>_default``): a row for a month whose partition does not exist yet lands there, so no
write ever fails for want of a partition.

- :func:`ensure_months` creates the partitions of some months ahead of need. It is idempotent
  (a month that exists is left alone; when all exist it is one catalog query and takes no lock)
  and safe to call from several processes at once: creators queue on a transaction-scoped
  advisory lock and look again once they hold it. Rows of the month already in the DEFAULT
  partition are moved into the new partition in the same transaction (PostgreSQL refuses to
  create a partition whose rows sit in the default).
- :func:`partitions` lists a table's partitions with their bounds; :func:`missing_months`
  says which months have none yet.
- :func:`drop_months_before` drops whole months that end at or before a cut-off, counting their
  rows first.

Creating or dropping a partition takes an ACCESS EXCLUSIVE lock on the table; jobs pass a
``lock_timeout`` so that they give up (and try again on their next run) rather than queue every
reader behind a long transaction. Only the table's owner may create or drop partitions: as the
runtime role (see :mod:`metering.grants`) both are skipped and the DEFAULT partition, and
row-by-row deletes, do the work until the owner's next ``hostmeter db upgrade``.

SQLite keeps plain tables: every function here is a no-op there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from metering import models as m

__all__ = [
    "JOB_LOCK_TIMEOUT",
    "MONTHS_AHEAD",
    "PARTITIONED",
    "DropResult",
    "EnsureResult",
    "Partition",
    "drop_months_before",
    "ensure_months",
    "include_name",
    "is_partition_name",
    "is_partitioned",
    "missing_months",
    "month_start",
    "months_ahead",
    "months_between",
    "partition_name",
    "partitions",
]

PARTITIONED = ("host_hours", "service_hours", "usage_snapshots")
"""The tables partitioned by month on PostgreSQL."""

MONTHS_AHEAD = 3
"""Months after the current one whose partitions ``db upgrade`` and the hourly job create."""

JOB_LOCK_TIMEOUT = 5.0
"""Seconds a job waits for a table's lock to create or drop partitions before it gives up (and
leaves it to its next run), so that readers never queue long behind it."""

PARTITION_LOCK_KEY = 0x686D5F70617274  # "hm_part": serialises every creator of partitions

_PARTITION_NAME = re.compile(
    rf"^(?:{'|'.join(PARTITIONED)})_(?:p\d{{4}}_(?:0[1-9]|1[0-2])|default)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Partition:
    """One partition of a partitioned table; ``start``/``end`` are None for the default."""

    table: str
    name: str
    start: datetime | None
    end: datetime | None
    is_default: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class EnsureResult:
    """What :func:`ensure_months` did: partitions created, rows moved out of the defaults,
    and why it did nothing (``not_owner``, ``lock_timeout``), if it gave up."""

    created: tuple[Partition, ...] = ()
    moved_rows: int = 0
    skipped: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DropResult:
    """What :func:`drop_months_before` dropped, with each partition's row count."""

    dropped: tuple[tuple[Partition, int], ...] = ()
    skipped: str | None = None
    rows: dict[str, int] = field(default_factory=dict)


# --- months and names ---------------------------------------------------------------------


def month_start(instant: datetime) -> datetime:
    """The start of the UTC calendar month containing ``instant``."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"refusing naive datetime {instant!r}: instants are UTC-aware")
    at = instant.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def _next_month(start: datetime) -> datetime | None:
    if start.year == 9999 and start.month == 12:
        return None  # the last month datetime can name: its partition is unbounded above
    year, month = divmod(start.month, 12)
    return datetime(start.year + year, month + 1, 1, tzinfo=UTC)


def months_ahead(at: datetime, count: int = MONTHS_AHEAD) -> list[datetime]:
    """The UTC month of ``at`` and the ``count`` months after it."""
    months = [month_start(at)]
    for _ in range(count):
        following = _next_month(months[-1])
        if following is None:
            break
        months.append(following)
    return months


def months_between(start: datetime, end: datetime) -> list[datetime]:
    """The UTC months that overlap ``[start, end)``, for :func:`ensure_months`."""
    months: list[datetime] = []
    month: datetime | None = month_start(start)
    while month is not None and month < end:
        months.append(month)
        month = _next_month(month)
    return months


def partition_name(table: str, month: datetime) -> str:
    """``host_hours_p2026_10`` for the October 2026 partition of ``host_hours``."""
    start = month_start(month)
    return f"{table}_p{start.year:04d}_{start.month:02d}"


def is_partition_name(name: str) -> bool:
    """Whether ``name`` is the name of one of our partitions (monthly or default)."""
    return _PARTITION_NAME.match(name) is not None


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's ``include_name`` hook: partitions are not tables of the models, so
    autogenerate and ``alembic check`` leave them out."""
    return not (type_ == "table" and name is not None and is_partition_name(name))


# --- catalog --------------------------------------------------------------------------------


def _postgres(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def is_partitioned(conn: Connection, table: str) -> bool:
    """Whether ``table`` is a partitioned table (False on SQLite and before migration 0010)."""
    if not _postgres(conn):
        return False
    kind = conn.execute(sa.text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"),
                        {"t": table}).scalar_one_or_none()
    return kind == "p"


# The bounds come back as text in the session's time zone ('2026-10-01 09:00:00+09'); cast
# back to timestamptz in the same session they are the exact instants, whatever the zone.
_LIST = sa.text(r"""
    SELECT p.relname AS "table", c.relname AS name,
           pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' AS is_default,
           (regexp_match(pg_get_expr(c.relpartbound, c.oid),
                         'FROM \(''([^'']*)''\)'))[1]::timestamptz AS start,
           (regexp_match(pg_get_expr(c.relpartbound, c.oid),
                         'TO \(''([^'']*)''\)'))[1]::timestamptz AS "end"
      FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid
      JOIN pg_class p ON p.oid = i.inhparent
     WHERE i.inhparent = to_regclass(:t)
     ORDER BY is_default, start
""")


def _aware(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def partitions(conn: Connection, table: str) -> list[Partition]:
    """The partitions of ``table``, monthly ones by start, the default last ([] on SQLite)."""
    if not _postgres(conn):
        return []
    return [Partition(table=r.table, name=r.name, start=_aware(r.start), end=_aware(r.end),
                      is_default=bool(r.is_default))
            for r in conn.execute(_LIST, {"t": table})]


def _owns(conn: Connection, tables: Sequence[str]) -> bool:
    return bool(conn.execute(sa.text(
        "SELECT coalesce(bool_and(pg_has_role(current_user, relowner, 'USAGE')), true) "
        "  FROM pg_class WHERE oid = ANY(CAST(:oids AS regclass[]))"),
        {"oids": list(tables)}).scalar_one())


def _literal(instant: datetime | None) -> str:
    return "MAXVALUE" if instant is None else f"('{instant.isoformat()}')"


class _LockTimeout(Exception):
    """A lock was not granted: within the lock timeout, or because of a deadlock."""


def _guarded(conn: Connection, lock_timeout: float | None, work: Callable[[], None]) -> None:
    """Run ``work`` in a savepoint, waiting at most ``lock_timeout`` seconds for each lock.

    A lock timeout (or a deadlock this side lost) rolls back the savepoint only (the caller's
    transaction goes on) and raises :class:`_LockTimeout`. The session's own ``lock_timeout`` is
    restored either way.
    """
    if lock_timeout is None:
        with conn.begin_nested():
            work()
        return
    before = conn.execute(sa.text("SELECT current_setting('lock_timeout')")).scalar_one()
    conn.execute(sa.text("SELECT set_config('lock_timeout', :v, true)"),
                 {"v": f"{max(1, round(lock_timeout * 1000))}ms"})
    try:
        with conn.begin_nested():
            work()
    except sa.exc.DBAPIError as exc:
        state = getattr(exc.orig, "sqlstate", None)
        if state == "55P03":  # lock_not_available
            raise _LockTimeout("lock_timeout") from exc
        if state == "40P01":  # deadlock_detected: this side was chosen to give way
            raise _LockTimeout("deadlock") from exc
        raise
    finally:
        conn.execute(sa.text("SELECT set_config('lock_timeout', :v, true)"), {"v": before})


# --- creating months ------------------------------------------------------------------------


def _columns(table: str) -> str:
    return ", ".join(f'"{c.name}"' for c in m.metadata.tables[table].columns)


def _create(conn: Connection, table: str, month: datetime, default: str | None) -> int:
    """Create the partition of ``month``, moving the month's rows out of ``default`` first;
    returns the rows moved. The caller holds the advisory lock and the table's lock."""
    start, end = month, _next_month(month)
    name = partition_name(table, month)
    bounds = f"FOR VALUES FROM {_literal(start)} TO {_literal(end)}"
    moved = 0
    if default is not None:
        in_month = f"hour >= '{start.isoformat()}'" + (
            f" AND hour < '{end.isoformat()}'" if end is not None else "")
        waiting = conn.exec_driver_sql(
            f'SELECT EXISTS (SELECT 1 FROM "{default}" WHERE {in_month})').scalar_one()
        if waiting:
            cols = _columns(table)
            conn.exec_driver_sql(
                f'CREATE TEMPORARY TABLE hm_partition_move (LIKE "{table}") ON COMMIT DROP')
            moved = conn.exec_driver_sql(
                f'WITH moved AS (DELETE FROM "{default}" WHERE {in_month} RETURNING {cols}) '
                f"INSERT INTO hm_partition_move ({cols}) SELECT {cols} FROM moved").rowcount
            conn.exec_driver_sql(f'CREATE TABLE "{name}" PARTITION OF "{table}" {bounds}')
            conn.exec_driver_sql(
                f'INSERT INTO "{table}" ({cols}) SELECT {cols} FROM hm_partition_move')
            conn.exec_driver_sql("DROP TABLE hm_partition_move")
            return int(moved)
    conn.exec_driver_sql(f'CREATE TABLE "{name}" PARTITION OF "{table}" {bounds}')
    return moved


def missing_months(conn: Connection, instants: Iterable[datetime], *,
                   tables: Sequence[str] = PARTITIONED) -> dict[str, list[datetime]]:
    """Per partitioned table, the UTC months of ``instants`` that have no partition yet."""
    if not _postgres(conn):
        return {}
    return _missing(conn, tables, sorted({month_start(at) for at in instants}))


def _missing(conn: Connection, tables: Sequence[str],
             months: Sequence[datetime]) -> dict[str, list[datetime]]:
    missing: dict[str, list[datetime]] = {}
    for table in tables:
        if not is_partitioned(conn, table):
            continue
        have = {p.start for p in partitions(conn, table) if not p.is_default}
        todo = [month for month in months if month not in have]
        if todo:
            missing[table] = todo
    return missing


def ensure_months(
    conn: Connection,
    instants: Iterable[datetime],
    *,
    tables: Sequence[str] = PARTITIONED,
    lock_timeout: float | None = None,
) -> EnsureResult:
    """Make sure every UTC month containing one of ``instants`` has its partition in each of
    ``tables``, in the caller's transaction.

    Idempotent and concurrency-safe (see the module docstring). Rows of a new month already in
    the DEFAULT partition are moved into it. With ``lock_timeout`` (seconds) a creation that
    cannot get its table's lock in time is given up whole (``skipped="lock_timeout"``, or
    ``"deadlock"``); a role
    that does not own the tables creates nothing (``skipped="not_owner"``). Does nothing on
    SQLite or on tables that are not partitioned.
    """
    months = sorted({month_start(at) for at in instants})
    if not _postgres(conn) or not months:
        return EnsureResult()
    if not _missing(conn, tables, months):
        return EnsureResult()
    if not _owns(conn, [t for t in tables if is_partitioned(conn, t)]):
        return EnsureResult(skipped="not_owner")
    created: list[Partition] = []
    moved = 0

    def work() -> None:
        nonlocal moved
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": PARTITION_LOCK_KEY})
        # Look again under the lock: another process may just have created them.
        for table, todo in _missing(conn, tables, months).items():
            conn.exec_driver_sql(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
            default = next((p.name for p in partitions(conn, table) if p.is_default), None)
            for month in todo:
                moved += _create(conn, table, month, default)
                created.append(Partition(table=table, name=partition_name(table, month),
                                         start=month, end=_next_month(month)))

    try:
        _guarded(conn, lock_timeout, work)
    except _LockTimeout as exc:
        return EnsureResult(skipped=str(exc))
    return EnsureResult(created=tuple(created), moved_rows=moved)


# --- dropping months ------------------------------------------------------------------------


def drop_months_before(
    conn: Connection,
    cutoff: datetime,
    *,
    tables: Sequence[str] = PARTITIONED,
    droppable: Callable[[Connection, Partition], bool] | None = None,
    lock_timeout: float | None = None,
) -> DropResult:
    """Drop the monthly partitions of ``tables`` that end at or before ``cutoff`` (and that
    ``droppable``, when given, accepts), counting each one's rows first.

    The default partition is never dropped. All or nothing: with ``lock_timeout`` a drop that
    cannot get its lock in time gives up every drop (``skipped="lock_timeout"`` or
    ``"deadlock"``); a role that
    does not own the tables drops nothing (``skipped="not_owner"``). ``rows`` sums the dropped
    rows per table. Does nothing on SQLite.
    """
    if not _postgres(conn):
        return DropResult()
    old = [p for table in tables if is_partitioned(conn, table)
           for p in partitions(conn, table)
           if not p.is_default and p.end is not None and p.end <= cutoff]
    if not old:
        return DropResult()
    if not _owns(conn, sorted({p.table for p in old})):
        return DropResult(skipped="not_owner")
    dropped: list[tuple[Partition, int]] = []

    def work() -> None:
        for part in old:
            # The table's lock first (DROP takes it anyway), so that no row arrives between
            # the check, the count and the drop.
            conn.exec_driver_sql(f'LOCK TABLE "{part.table}" IN ACCESS EXCLUSIVE MODE')
            if droppable is not None and not droppable(conn, part):
                continue
            rows = conn.exec_driver_sql(f'SELECT count(*) FROM "{part.name}"').scalar_one()
            conn.exec_driver_sql(f'DROP TABLE "{part.name}"')
            dropped.append((part, int(rows)))

    try:
        _guarded(conn, lock_timeout, work)
    except _LockTimeout as exc:
        return DropResult(skipped=str(exc))
    totals: dict[str, int] = {}
    for part, rows in dropped:
        totals[part.table] = totals.get(part.table, 0) + rows
    return DropResult(dropped=tuple(dropped), rows=totals)
