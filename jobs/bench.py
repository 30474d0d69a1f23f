"""``hostmeter bench``: time ingest and a month of snapshots on a generated fleet.

Not a timed test. It writes a synthetic fleet **straight into the configured database** with
set-based SQL, then measures three things and prints one JSON document:

- **generate**: wall time to write the fleet (``generate_s``), step by step;
- **ingest**: metric observations (metric names in posts) per second through
  :meth:`metering.ingest.UsageRecorder.record`, the API of the metric-post path: a sample of
  agent posts (one a minute per host, ~100 names each) in calls of ``posts_per_call`` posts,
  then a few lone posts, one call (one transaction) each;
- **snapshot**: a month of hours through ``snapshot-usage`` (:func:`jobs.snapshot_usage.run`
  under :func:`jobs.runtime.run_job`), beside the *floor*: the time of one plain aggregate
  statement that reads the same ``host_hours`` rows, and the ratio of the two.

After the snapshot it checks what cannot be faked: the host count summed over the month's
``usage_snapshots`` equals ``count(*)`` of the month's ``host_hours`` (and the metric sums
agree), every hour of the month is in ``snapshot_hours`` under this run's id, and the generated
row counts equal the planned ones. Any failed check makes the command exit 1. CI runs only the
``small`` tier, for these checks.

The fleet (tenant ``t``, host ``n``; ``mix`` is a multiplicative hash of an integer, so the
same tier always gives the same rows):

- tenants ``bench-t-<t>``; each of the first ``tenants`` hosts goes to its own tenant, the rest
  to skewed tenants (low numbers are large tenants: tenant 1 of ``medium`` has ~600 hosts);
- plans from the first hour: mostly ``standard``; ``t % 20 == 0`` free, ``t % 20 == 10``
  trial, ``t % 20 == 5`` trial converting to standard mid-month, ``t % 25 == 3`` signs up
  (standard) at some hour of the month and has no plan before;
- hosts ``bench-h-<n>``: 80 % standard, 20 % micro; one in ten of each over its metric limit
  (200 standard / 30 micro), with a per-hour wobble of 0–3 metrics; ``n % 10 == 3`` joins
  mid-month and ``n % 10 == 7`` stops posting mid-month, every other host posts every hour;
- ``service_hours`` every hour for ``t % 4 == 1``; 1–5 URL monitors for ``t % 3 == 0``, some
  deleted mid-month; an anomaly-detection role with all its standard hosts for ``t % 50 == 7``.

Generation is set-based SQL only: ``INSERT … SELECT`` from temporary tables of integers and
hours made by ``generate_series`` (PostgreSQL) or a recursive CTE (SQLite). ``host_hours`` is
written one day per transaction, hour by hour, in the order ingest writes a live database, so
each hour's rows sit together on disk as they would in production (snapshots read one hour at
a time). Then PostgreSQL gets ``VACUUM ANALYZE`` and SQLite a WAL checkpoint, the steady state
of a database that autovacuum (or the last checkpoint) has caught up with.

``metric_bits`` of a generated row is the bitmap of ordinals ``0 … metric_count-1`` (so its
population count *is* ``metric_count``), taken from a small lookup table; the generated tenants
have **no** ``metric_names`` dictionary, so they must never receive real posts (snapshots only
read ``metric_count``). The ingest sample posts to its own tenants (``bench-ingest-<i>``),
which the real ingest path creates, dictionary included.

Safety: bench refuses (exit 2) a database that holds any tenant whose key does not start with
``bench-``, and deletes the previous bench data before generating, so it can be re-run. The
check and the deletion are one transaction that holds the ingest lock; it also refuses, and
deletes nothing, when other data (invoices, say) still refers to the bench tenants.
"""

from __future__ import annotations

import json
import platform
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from billing.models import billing_runs
from billing.models import invoices as billing_invoices
from billing.service import BillingRequest, close_period
from jobs import snapshot_usage
from jobs.clikit import EXIT_BAD_INPUT, EXIT_FAILED, State, fail
from jobs.console import progress
from jobs.errors import JobError
from jobs.runtime import JobContext, new_run_id, run_job
from metering import db
from metering import models as m
from metering.errors import InvalidWindow
from metering.ingest import INGEST_LOCK_KEY, UsageRecorder
from metering.records import HostPost, Record
from metering.settings import Settings
from metering.timeutil import HOUR, hours_between, month_bounds, parse_period

__all__ = [
    "DEFAULT_PERIOD",
    "TIERS",
    "BenchRefused",
    "BenchReport",
    "BenchTier",
    "bench_command",
    "check_bench_database",
    "planned_counts",
    "run_bench",
]

DEFAULT_PERIOD = "2026-10"
BENCH_PREFIX = "bench-"
SNAPSHOT_RUN_PREFIX = "bench-"
_MAX_METRICS = 512  # above any generated metric_count (standard tops out at 403)

Progress = Callable[[str, int | None], Any]
"""A progress factory: ``progress(description, total)`` is a context manager yielding
``update(done, total=None)`` (:func:`jobs.console.progress`)."""


class BenchRefused(JobError):
    """The database holds data that is not bench data; bench writes nothing."""


# --- tiers ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchTier:
    """The size of one bench run."""

    name: str
    tenants: int
    hosts: int
    hours: int | None = None
    """Hours of the month to generate and snapshot, from its start; ``None``: all of them."""
    ingest_tenants: int
    ingest_hosts_per_tenant: int
    ingest_hours: int
    ingest_posts_per_host_hour: int
    """At most 60: one post a minute, as an agent does."""
    metrics_per_post: int = 100
    posts_per_call: int = 1000
    """Posts per :meth:`UsageRecorder.record` call (one transaction) in the batched sample."""
    single_posts: int = 100
    """Posts sent one per call (one transaction each): the latency of a lone post."""

    @property
    def ingest_posts(self) -> int:
        return (
            self.ingest_tenants * self.ingest_hosts_per_tenant * self.ingest_hours
            * self.ingest_posts_per_host_hour
        )


TIERS: dict[str, BenchTier] = {
    "small": BenchTier(
        name="small", tenants=20, hosts=200, ingest_tenants=2, ingest_hosts_per_tenant=5,
        ingest_hours=4, ingest_posts_per_host_hour=50, posts_per_call=500, single_posts=50,
    ),
    "medium": BenchTier(
        name="medium", tenants=2_000, hosts=30_000, ingest_tenants=5, ingest_hosts_per_tenant=20,
        ingest_hours=10, ingest_posts_per_host_hour=50, posts_per_call=1000, single_posts=500,
    ),
}


# --- the fleet's shape, in Python (the SQL below computes the same, set-based) ---------------

# One odd multiplier per use (Knuth's, then the xxHash and MurmurHash primes): n * M mod 2^32
# gives decorrelated sequences for different M, where an additive salt would not.
_MULTIPLIERS = (2654435761, 2246822519, 3266489917, 668265263, 374761393, 3432918353,
                461845907, 2869860233, 1540483477)


def _mix(n: int, salt: int) -> int:
    """A deterministic pseudo-random 16-bit value of ``n`` (the SQL twin is :func:`_mix_sql`)."""
    return (n * _MULTIPLIERS[salt] % 4294967296) // 65536


def _mix_sql(expr: str, salt: int) -> str:
    return f"((CAST({expr} AS BIGINT) * {_MULTIPLIERS[salt]}) % 4294967296 / 65536)"


def _tenant_of(n: int, tenants: int) -> int:
    if n <= tenants:
        return n
    u = _mix(n, 1) % tenants
    return 1 + u * u // tenants


def _is_standard(n: int) -> bool:
    return _mix(n, 2) % 10 < 8


def _lifetime(n: int, hours: int) -> tuple[int, int]:
    """First and last hour index (inclusive) in which host ``n`` posts."""
    if n % 10 == 3:
        return _mix(n, 5) % hours, hours - 1
    if n % 10 == 7:
        return 0, _mix(n, 5) % hours
    return 0, hours - 1


def _monitors(t: int) -> int:
    return 1 + t % 5 if t % 3 == 0 else 0


def planned_counts(tier: BenchTier, hours: int) -> dict[str, int]:
    """The rows the generator must write for ``tier`` over ``hours`` hours."""
    role_tenants = {t for t in range(1, tier.tenants + 1) if t % 50 == 7}
    host_hours = members = 0
    for n in range(1, tier.hosts + 1):
        first, last = _lifetime(n, hours)
        host_hours += last - first + 1
        members += _is_standard(n) and _tenant_of(n, tier.tenants) in role_tenants
    tenants = range(1, tier.tenants + 1)
    return {
        "tenants": tier.tenants,
        "hosts": tier.hosts,
        "host_hours": host_hours,
        "plan_changes": tier.tenants + sum(t % 20 == 5 for t in tenants),
        "service_hours": sum(t % 4 == 1 for t in tenants) * hours,
        "monitor_events": sum(
            _monitors(t) + sum((t + k) % 4 == 0 for k in range(1, _monitors(t) + 1))
            for t in tenants
        ),
        "role_events": len(role_tenants),
        "role_member_events": members,
    }


# --- safety and cleanup ---------------------------------------------------------------------

_TENANT_TABLES = (
    # children first; every row of these belongs to a tenant (foreign key). The bench's own
    # close writes draft invoices only (never final ones, which no one may delete).
    "invoice_adjustments", "invoice_lines", "invoices",
    "usage_snapshot_roles", "usage_snapshots", "role_member_events", "role_events",
    "monitor_events", "plan_changes", "service_hours", "host_hours", "metric_names",
)


def check_bench_database(conn: Connection) -> None:
    """Raise :class:`BenchRefused` unless every tenant's key starts with ``bench-``."""
    t = m.tenants
    foreign = sa.func.substr(t.c.key, 1, len(BENCH_PREFIX)) != BENCH_PREFIX
    count, example = conn.execute(
        sa.select(sa.func.count(), sa.func.min(t.c.key)).where(foreign)
    ).one()
    if count:
        raise BenchRefused(
            f"refusing to bench {db.redact_url(str(conn.engine.url))}: it holds {count} "
            f"tenant(s) that are not bench data (e.g. {example!r}); bench writes a synthetic "
            "fleet and deletes data, so point --database-url at a scratch database",
            tenants=count,
        )


def _lock_ingest(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": INGEST_LOCK_KEY})


def _delete_bench_data(conn: Connection) -> None:
    """Delete every bench row; the caller has checked that all tenants are bench tenants."""
    kept = conn.execute(sa.select(sa.func.count()).select_from(billing_invoices)
                        .where(billing_invoices.c.status != "draft")).scalar_one()
    if kept:  # final and void invoices are never deleted, not even a bench's
        raise _still_referenced(conn, ["final or void invoices"])
    if conn.dialect.name == "postgresql":
        # TRUNCATE, not DELETE: PostgreSQL checks each deleted tenant against host_hours
        # (no index leads with tenant_id), which would scan millions of dead rows per tenant.
        conn.exec_driver_sql("TRUNCATE " + ", ".join(_TENANT_TABLES))
    else:
        for name in _TENANT_TABLES:  # no WHERE (and no foreign keys): emptied wholesale
            conn.exec_driver_sql(f"DELETE FROM {name}")
    sh = m.snapshot_hours
    conn.execute(sa.delete(sh).where(sh.c.run_id.like(f"{SNAPSHOT_RUN_PREFIX}%")))
    br = billing_runs
    conn.execute(sa.delete(br).where(br.c.run_id.like(f"{SNAPSHOT_RUN_PREFIX}%")))
    try:
        conn.execute(sa.delete(m.hosts))
        conn.execute(sa.delete(m.tenants))
    except sa.exc.IntegrityError as exc:  # PostgreSQL: e.g. invoices of bench tenants
        table = getattr(getattr(exc.orig, "diag", None), "table_name", None) or "other tables"
        raise _still_referenced(conn, [table]) from exc
    if conn.dialect.name == "sqlite":  # foreign keys are off during the cleanup: check by hand
        dangling = sorted({row[0] for row in conn.exec_driver_sql("PRAGMA foreign_key_check")})
        if dangling:
            raise _still_referenced(conn, dangling)


def _still_referenced(conn: Connection, tables: list[str]) -> BenchRefused:
    return BenchRefused(
        f"refusing to bench {db.redact_url(str(conn.engine.url))}: {', '.join(tables)} still "
        "refer to bench tenants (did billing run on it?); bench deletes only usage data, so "
        "point --database-url at a fresh scratch database",
        tables=tables,
    )


# --- generation -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateResult:
    """What the generator wrote and how long each step took."""

    cleanup_s: float
    generate_s: float
    steps_s: dict[str, float]
    counts: dict[str, int]
    planned: dict[str, int]

    @property
    def as_planned(self) -> bool:
        return self.counts == self.planned


_SQLITE_GENERATE_CACHE_KIB = 1 << 20  # 1 GiB, for the generating connection only
_SQLITE_DEFAULT_CACHE = -2000  # SQLite's compiled-in default (about 2 MB)
_TEMP_TABLES = ("bench_n", "bench_hours", "bench_bits", "bench_fleet")


def _temp_ddl(dialect: str) -> list[str]:
    ts, blob = ("TIMESTAMPTZ", "BYTEA") if dialect == "postgresql" else ("TEXT", "BLOB")
    return [
        "CREATE TEMPORARY TABLE bench_n (n INTEGER PRIMARY KEY)",
        f"CREATE TEMPORARY TABLE bench_hours (idx INTEGER PRIMARY KEY, hour {ts} NOT NULL)",
        f"CREATE TEMPORARY TABLE bench_bits (n INTEGER PRIMARY KEY, bits {blob} NOT NULL)",
        "CREATE TEMPORARY TABLE bench_fleet (n INTEGER PRIMARY KEY, tenant_n INTEGER NOT NULL,"
        " tenant_id INTEGER NOT NULL, host_id INTEGER, kind VARCHAR(8) NOT NULL,"
        " base INTEGER NOT NULL, first_h INTEGER NOT NULL, last_h INTEGER NOT NULL)",
    ]


def _fill_series(conn: Connection, count: int, start: datetime, hours: int) -> None:
    """The integers ``1 … count`` and the hours ``start + idx h``, generated in SQL."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("INSERT INTO bench_n (n) SELECT generate_series(1, :c)"),
                     {"c": count})
        conn.execute(
            sa.text(
                "INSERT INTO bench_hours (idx, hour) SELECT i, :start + i * interval '1 hour'"
                " FROM generate_series(0, :h - 1) AS s(i)"
            ),
            {"start": start, "h": hours},
        )
    else:
        conn.execute(
            sa.text(
                "INSERT INTO bench_n (n) WITH RECURSIVE s(n) AS"
                " (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < :c) SELECT n FROM s"
            ),
            {"c": count},
        )
        # SQLAlchemy's SQLite DateTime text form, which UTCDateTime stores (naive UTC).
        conn.execute(
            sa.text(
                "INSERT INTO bench_hours (idx, hour) WITH RECURSIVE s(i) AS"
                " (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i + 1 < :h)"
                " SELECT i, strftime('%Y-%m-%d %H:%M:%S', :start, '+' || i || ' hours')"
                " || '.000000' FROM s"
            ),
            {"start": start.strftime("%Y-%m-%d %H:%M:%S"), "h": hours},
        )
    # Bitmap of ordinals 0 … k-1 for every count k: a tiny dictionary, not fleet rows.
    conn.execute(
        sa.text("INSERT INTO bench_bits (n, bits) VALUES (:n, :bits)"),
        [{"n": k, "bits": ((1 << k) - 1).to_bytes((k + 7) // 8 or 1, "little")}
         for k in range(_MAX_METRICS + 1)],
    )


def _key(prefix: str, expr: str) -> str:
    return f"'{prefix}' || CAST({expr} AS VARCHAR(12))"


_TENANTS_SQL = f"INSERT INTO tenants (key) SELECT {_key('bench-t-', 'n')} FROM bench_n" \
    " WHERE n <= :tenants ORDER BY n"

_FLEET_SQL = f"""
INSERT INTO bench_fleet (n, tenant_n, tenant_id, kind, base, first_h, last_h)
SELECT s.n, s.tn, t.id, s.kind,
       CASE WHEN s.kind = 'standard'
            THEN CASE WHEN s.over = 0 THEN 201 + s.r % 200 ELSE 40 + s.r % 150 END
            ELSE CASE WHEN s.over = 0 THEN 31 + s.r % 40 ELSE 8 + s.r % 20 END END,
       CASE WHEN s.n % 10 = 3 THEN s.life ELSE 0 END,
       CASE WHEN s.n % 10 = 7 THEN s.life ELSE :hours - 1 END
FROM (
  SELECT n,
         CASE WHEN n <= :tenants THEN n
              ELSE 1 + ({_mix_sql('n', 1)} % :tenants) * ({_mix_sql('n', 1)} % :tenants)
                       / :tenants END AS tn,
         CASE WHEN {_mix_sql('n', 2)} % 10 < 8 THEN 'standard' ELSE 'micro' END AS kind,
         {_mix_sql('n', 3)} % 10 AS over,
         {_mix_sql('n', 4)} AS r,
         {_mix_sql('n', 5)} % :hours AS life
  FROM bench_n WHERE n <= :hosts
) AS s
JOIN tenants t ON t.key = {_key('bench-t-', 's.tn')}
"""

_HOSTS_SQL = f"INSERT INTO hosts (tenant_id, key) SELECT tenant_id, {_key('bench-h-', 'n')}" \
    " FROM bench_fleet ORDER BY n"

_FLEET_IDS_SQL = f"""
UPDATE bench_fleet SET host_id = (
  SELECT h.id FROM hosts h
  WHERE h.tenant_id = bench_fleet.tenant_id AND h.key = {_key('bench-h-', 'bench_fleet.n')})
"""

_HOST_HOURS_SQL = """
INSERT INTO host_hours (host_id, hour, tenant_id, kind, metric_count, metric_bits)
SELECT f.host_id, hr.hour, f.tenant_id, f.kind, f.base + (hr.idx + f.n) % 4, b.bits
FROM bench_hours hr
JOIN bench_fleet f ON hr.idx BETWEEN f.first_h AND f.last_h
JOIN bench_bits b ON b.n = f.base + (hr.idx + f.n) % 4
WHERE hr.idx >= :lo AND hr.idx < :hi
ORDER BY hr.idx, f.tenant_id, f.n
"""

_TENANT_N = f"""
  FROM bench_n tn
  JOIN tenants t ON t.key = {_key('bench-t-', 'tn.n')}
"""

_PLANS_SQL = f"""
INSERT INTO plan_changes (tenant_id, at, plan)
SELECT t.id, hr.hour,
       CASE WHEN tn.n % 20 = 0 THEN 'free'
            WHEN tn.n % 20 IN (5, 10) THEN 'trial' ELSE 'standard' END
{_TENANT_N}
  JOIN bench_hours hr
    ON hr.idx = CASE WHEN tn.n % 25 = 3 THEN {_mix_sql('tn.n', 6)} % :hours ELSE 0 END
 WHERE tn.n <= :tenants
"""

_CONVERSIONS_SQL = f"""
INSERT INTO plan_changes (tenant_id, at, plan)
SELECT t.id, hr.hour, 'standard'
{_TENANT_N}
  JOIN bench_hours hr ON hr.idx = 1 + {_mix_sql('tn.n', 7)} % (:hours - 1)
 WHERE tn.n <= :tenants AND tn.n % 20 = 5
"""

_SERVICE_HOURS_SQL = f"""
INSERT INTO service_hours (tenant_id, hour, metric_count, metric_bits)
SELECT t.id, hr.hour, 3 + tn.n % 30, b.bits
{_TENANT_N}
  JOIN bench_bits b ON b.n = 3 + tn.n % 30
  CROSS JOIN bench_hours hr
 WHERE tn.n <= :tenants AND tn.n % 4 = 1
"""

_MONITORS_SQL = f"""
INSERT INTO monitor_events (tenant_id, monitor, at, present)
SELECT t.id, {_key('bench-m-', 'k.n')}, hr.hour, TRUE
{_TENANT_N}
  JOIN bench_n k ON k.n <= 1 + tn.n % 5
  JOIN bench_hours hr ON hr.idx = 0
 WHERE tn.n <= :tenants AND tn.n % 3 = 0
"""

_MONITOR_DELETIONS_SQL = f"""
INSERT INTO monitor_events (tenant_id, monitor, at, present)
SELECT t.id, {_key('bench-m-', 'k.n')}, hr.hour, FALSE
{_TENANT_N}
  JOIN bench_n k ON k.n <= 1 + tn.n % 5
  JOIN bench_hours hr ON hr.idx = 1 + {_mix_sql('tn.n * 8 + k.n', 8)} % (:hours - 1)
 WHERE tn.n <= :tenants AND tn.n % 3 = 0 AND (tn.n + k.n) % 4 = 0
"""

_ROLES_SQL = f"""
INSERT INTO role_events (tenant_id, role, at, enabled)
SELECT t.id, 'web:app', hr.hour, TRUE
{_TENANT_N}
  JOIN bench_hours hr ON hr.idx = 0
 WHERE tn.n <= :tenants AND tn.n % 50 = 7
"""

_ROLE_MEMBERS_SQL = """
INSERT INTO role_member_events (tenant_id, role, host_id, at, member)
SELECT f.tenant_id, 'web:app', f.host_id, hr.hour, TRUE
  FROM bench_fleet f
  JOIN bench_hours hr ON hr.idx = 0
 WHERE f.tenant_n % 50 = 7 AND f.kind = 'standard'
"""

_COUNTED = ("tenants", "hosts", "host_hours", "plan_changes", "service_hours", "monitor_events",
            "role_events", "role_member_events")


def _table_counts(conn: Connection) -> dict[str, int]:
    return {
        name: int(conn.execute(sa.select(sa.func.count()).select_from(m.metadata.tables[name]))
                  .scalar_one())
        for name in _COUNTED
    }


def generate_fleet(
    engine: Engine,
    tier: BenchTier,
    start: datetime,
    hours: int,
    *,
    progress_factory: Progress = progress,
    day_chunk: int = 24,
) -> GenerateResult:
    """Delete earlier bench data and write ``tier``'s fleet for ``hours`` hours from ``start``."""
    if hours < 2:
        raise ValueError("bench needs at least two hours")
    dialect = engine.dialect.name
    params = {"tenants": tier.tenants, "hosts": tier.hosts, "hours": hours}
    steps: dict[str, float] = {}
    planned = planned_counts(tier, hours)

    with engine.connect() as conn:
        t0 = time.perf_counter()
        if dialect == "sqlite":
            # SQLite only empties a table wholesale (its truncate optimisation) when no foreign
            # key involves it; row by row, 20M host_hours take minutes. Children go first, so
            # nothing dangles. (The pragma is a no-op inside a transaction: set it before.)
            _driver_sql(conn, "PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                _lock_ingest(conn)
                check_bench_database(conn)
                _delete_bench_data(conn)
        finally:
            if dialect == "sqlite":
                _driver_sql(conn, "PRAGMA foreign_keys=ON")
        cleanup_s = time.perf_counter() - t0

        started = time.perf_counter()

        def step(name: str, *statements: tuple[str, dict[str, Any]]) -> None:
            t = time.perf_counter()
            with conn.begin():
                for sql, extra in statements:
                    conn.execute(sa.text(sql), {**params, **extra})
            steps[name] = round(time.perf_counter() - t, 3)

        chunks = list(range(0, hours, day_chunk))
        if dialect == "sqlite":
            # Rows go in hour by hour, as ingest writes them, so every hour inserts into the
            # (host_id, hour) index at every host's position: keep that index in memory while
            # generating (the default 2 MB cache makes the medium tier several times slower).
            _driver_sql(conn, f"PRAGMA cache_size=-{_SQLITE_GENERATE_CACHE_KIB}")
        with progress_factory("generate", 8 + len(chunks)) as update:
            t = time.perf_counter()
            with conn.begin():
                for name in _TEMP_TABLES:
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
                for ddl in _temp_ddl(dialect):
                    conn.exec_driver_sql(ddl)
                _fill_series(conn, max(tier.hosts, tier.tenants, 8), start, hours)
            steps["series"] = round(time.perf_counter() - t, 3)
            update(1)
            step("tenants", (_TENANTS_SQL, {}))
            update(2)
            step("plan_changes", (_PLANS_SQL, {}), (_CONVERSIONS_SQL, {}))
            update(3)
            step("hosts", (_FLEET_SQL, {}), (_HOSTS_SQL, {}), (_FLEET_IDS_SQL, {}))
            if dialect == "postgresql":  # temporary tables are never auto-analysed
                with conn.begin():
                    for name in _TEMP_TABLES:
                        conn.exec_driver_sql(f"ANALYZE {name}")
            update(4)
            t = time.perf_counter()
            for i, lo in enumerate(chunks):
                with conn.begin():
                    conn.execute(sa.text(_HOST_HOURS_SQL), {"lo": lo, "hi": lo + day_chunk})
                update(5 + i)
            steps["host_hours"] = round(time.perf_counter() - t, 3)
            step("service_hours", (_SERVICE_HOURS_SQL, {}))
            step("monitor_events", (_MONITORS_SQL, {}), (_MONITOR_DELETIONS_SQL, {}))
            step("roles", (_ROLES_SQL, {}), (_ROLE_MEMBERS_SQL, {}))
            update(5 + len(chunks))
            with conn.begin():
                for name in _TEMP_TABLES:
                    conn.exec_driver_sql(f"DROP TABLE {name}")
            if dialect == "sqlite":
                _driver_sql(conn, f"PRAGMA cache_size={_SQLITE_DEFAULT_CACHE}")
            t = time.perf_counter()
            _settle(engine, conn)
            steps["settle"] = round(time.perf_counter() - t, 3)
            update(8 + len(chunks))
        generate_s = time.perf_counter() - started
        with conn.begin():
            counts = _table_counts(conn)
    return GenerateResult(
        cleanup_s=round(cleanup_s, 3),
        generate_s=round(generate_s, 3),
        steps_s=steps,
        counts=counts,
        planned=planned,
    )


def _settle(engine: Engine, conn: Connection) -> None:
    """Bring the new tables to the steady state a live database is in before timing reads.

    PostgreSQL: ``VACUUM ANALYZE`` (what autovacuum would soon do: planner statistics, hint
    bits, the visibility map). SQLite: a WAL checkpoint, so reads do not wade through the log.
    """
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as auto:
            for name in ("tenants", "hosts", "plan_changes", "host_hours", "service_hours",
                         "monitor_events", "role_events", "role_member_events"):
                auto.exec_driver_sql(f"VACUUM ANALYZE {name}")
    else:
        _driver_sql(conn, "PRAGMA wal_checkpoint(TRUNCATE)")


def _driver_sql(conn: Connection, sql: str) -> None:
    """Run ``sql`` on the driver connection, outside any SQLAlchemy transaction (SQLite)."""
    conn.connection.driver_connection.execute(sql)  # type: ignore[union-attr]


# --- ingest ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestTiming:
    """Throughput of one ingest sample."""

    posts: int
    observations: int
    calls: int
    seconds: float
    rows_written: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "posts": self.posts,
            "observations": self.observations,
            "calls": self.calls,
            "posts_per_call": self.posts // self.calls if self.calls else 0,
            "seconds": round(self.seconds, 3),
            "posts_per_s": round(self.posts / self.seconds, 1) if self.seconds else None,
            "observations_per_s": (
                round(self.observations / self.seconds, 1) if self.seconds else None
            ),
            "rows_written": self.rows_written,
        }


def _names(count: int, host: int) -> tuple[str, ...]:
    base = ("loadavg1", "loadavg5", "loadavg15", "cpu.user.percentage", "cpu.system.percentage",
            "memory.used", "memory.free", "disk.sda.reads.delta", "disk.sda.writes.delta",
            "interface.eth0.rxBytes.delta", "interface.eth0.txBytes.delta")
    return base + tuple(f"custom.app{host % 7}.metric{i:04d}" for i in range(count - len(base)))


def ingest_posts(tier: BenchTier, start: datetime, hours: int) -> list[HostPost]:
    """The batched ingest sample, in arrival order (by minute, then host).

    Each host posts ``metrics_per_post`` names a minute: 90 % the same every time, the rest
    rotating through a larger pool, so some posts add bits to the hour's bitmap and most
    merge into it without change, as on a live service.
    """
    steady = tier.metrics_per_post * 9 // 10
    rotating = tier.metrics_per_post - steady
    posts: list[HostPost] = []
    stride = max(1, hours // tier.ingest_hours)
    hosts = [
        (f"bench-ingest-{i}", f"bench-ingest-h-{j}", "micro" if j % 4 == 3 else "standard",
         _names(steady + 4 * rotating, j))
        for i in range(1, tier.ingest_tenants + 1)
        for j in range(1, tier.ingest_hosts_per_tenant + 1)
    ]
    for k in range(tier.ingest_hours):
        hour = start + ((k * stride + stride // 2) % hours) * HOUR
        for p in range(tier.ingest_posts_per_host_hour):
            at = hour + timedelta(minutes=p % 60, seconds=7)
            for tenant, host, kind, pool in hosts:
                r = steady + (p * rotating) % (3 * rotating)
                metrics = pool[:steady] + pool[r : r + rotating]
                posts.append(HostPost(tenant=tenant, host=host, kind=kind, at=at,
                                      metrics=metrics))
    return posts


def _timed_record(recorder: UsageRecorder, calls: list[list[Record]],
                  update: Callable[..., None]) -> IngestTiming:
    written = 0
    started = time.perf_counter()
    for i, call in enumerate(calls, start=1):
        written += recorder.record(call).written_rows
        update(i)
    seconds = time.perf_counter() - started
    posts = sum(len(c) for c in calls)
    observations = sum(len(r.metrics) for c in calls for r in c if isinstance(r, HostPost))
    return IngestTiming(posts=posts, observations=observations, calls=len(calls),
                        seconds=seconds, rows_written=written)


def time_ingest(
    engine: Engine, tier: BenchTier, start: datetime, hours: int, *,
    progress_factory: Progress = progress,
) -> tuple[IngestTiming, IngestTiming]:
    """Push the batched sample, then lone posts; returns (batched, single) timings."""
    posts = ingest_posts(tier, start, hours)
    batched: list[list[Record]] = [
        list(posts[i : i + tier.posts_per_call])
        for i in range(0, len(posts), tier.posts_per_call)
    ]
    # Lone posts: the same hosts a little later in the same hours (merging into existing rows
    # or opening new minutes), one transaction each.
    step = max(1, len(posts) // max(1, tier.single_posts))
    single: list[list[Record]] = [
        [HostPost(tenant=p.tenant, host=p.host, kind=p.kind, at=p.at + timedelta(seconds=30),
                  metrics=p.metrics)]
        for p in posts[::step][: tier.single_posts]
    ]
    recorder = UsageRecorder(engine)
    with progress_factory("ingest", len(batched)) as update:
        batch_timing = _timed_record(recorder, batched, update)
    with progress_factory("ingest (one post per call)", len(single)) as update:
        single_timing = _timed_record(recorder, single, update)
    return batch_timing, single_timing


# --- snapshot and floor ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotTiming:
    """A month of snapshots beside the floor statement."""

    run_id: str
    status: str
    error: str | None
    hours: int
    snapshot_s: float
    floor_s: float
    floor_rows: int
    floor_sql: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "error": self.error,
            "hours": self.hours,
            "snapshot_s": round(self.snapshot_s, 3),
            "per_hour_mean_s": round(self.snapshot_s / self.hours, 4) if self.hours else None,
            "floor_s": round(self.floor_s, 3),
            "ratio": round(self.snapshot_s / self.floor_s, 2) if self.floor_s else None,
            "floor_rows": self.floor_rows,
            "floor_sql": self.floor_sql,
        }


def floor_statement(start: datetime, end: datetime) -> sa.Select[Any]:
    """One plain aggregate over the same ``host_hours`` rows the snapshots read."""
    hh = m.host_hours
    return (
        sa.select(hh.c.tenant_id, hh.c.hour, sa.func.count(), sa.func.sum(hh.c.metric_count))
        .where(hh.c.hour >= start, hh.c.hour < end)
        .group_by(hh.c.tenant_id, hh.c.hour)
    )


def time_snapshots(
    engine: Engine, settings: Settings, hour_list: list[datetime], *,
    progress_factory: Progress = progress,
) -> SnapshotTiming:
    run_id = f"{SNAPSHOT_RUN_PREFIX}{new_run_id()}"
    with progress_factory("snapshot", len(hour_list)) as update:
        ctx = JobContext(engine=engine, settings=settings, run_id=run_id, trigger="bench",
                         progress=update)
        started = time.perf_counter()
        result = run_job("snapshot-usage", snapshot_usage.run, ctx, hour_list[0],
                         hours=hour_list)
        snapshot_s = time.perf_counter() - started
    stmt = floor_statement(hour_list[0], hour_list[-1] + HOUR)
    with engine.connect() as conn:
        started = time.perf_counter()
        rows = conn.execute(stmt).all()
        floor_s = time.perf_counter() - started
        conn.rollback()
    sql = " ".join(str(stmt.compile(dialect=engine.dialect)).split())
    return SnapshotTiming(
        run_id=run_id, status=result.status, error=result.error, hours=len(hour_list),
        snapshot_s=snapshot_s, floor_s=floor_s, floor_rows=len(rows), floor_sql=sql,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseTiming:
    """The month's close (every tenant rated, draft invoices written) beside its floor: one plain
    aggregate statement over the same month of snapshots."""

    status: str
    tenants: int
    invoices_written: int
    rebuilt_hours: int
    close_s: float
    floor_s: float
    floor_rows: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "tenants": self.tenants,
            "invoices_written": self.invoices_written,
            "rebuilt_hours": self.rebuilt_hours,
            "close_s": round(self.close_s, 3),
            "floor_s": round(self.floor_s, 3),
            "ratio": round(self.close_s / self.floor_s, 2) if self.floor_s else None,
            "floor_rows": self.floor_rows,
        }


def close_floor_statement(start: datetime, end: datetime) -> sa.Select[Any]:
    """What any close must at least do: read the month's snapshots once, summed per tenant."""
    us = m.usage_snapshots
    return (
        sa.select(us.c.tenant_id, sa.func.count(), sa.func.sum(us.c.standard_hosts),
                  sa.func.sum(us.c.micro_hosts), sa.func.sum(us.c.standard_overage),
                  sa.func.sum(us.c.micro_overage), sa.func.sum(us.c.service_metrics),
                  sa.func.sum(us.c.monitors))
        .where(us.c.hour >= start, us.c.hour < end)
        .group_by(us.c.tenant_id)
    )


def time_close(engine: Engine, settings: Settings, period: str) -> CloseTiming:
    start, end = month_bounds(period, settings.zone)
    req = BillingRequest(period=period, zone=settings.zone, logical_time=end, actor="bench",
                         run_id=f"{SNAPSHOT_RUN_PREFIX}{new_run_id()}", now=end)
    started = time.perf_counter()
    outcome = close_period(engine, req)
    close_s = time.perf_counter() - started
    with engine.connect() as conn:
        started = time.perf_counter()
        rows = conn.execute(close_floor_statement(start, end)).all()
        floor_s = time.perf_counter() - started
        conn.rollback()
    return CloseTiming(status=outcome.status, tenants=len(outcome.tenants),
                       invoices_written=outcome.counts()["invoices_written"],
                       rebuilt_hours=outcome.rebuilt_hours, close_s=close_s, floor_s=floor_s,
                       floor_rows=len(rows))


# --- checks ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One correctness check: its name, whether it held, and the numbers compared."""

    name: str
    ok: bool
    details: dict[str, Any] = field(default_factory=dict)


def run_checks(
    engine: Engine, start: datetime, end: datetime, hours: int, run_id: str,
    generated: GenerateResult,
) -> list[Check]:
    us, hh, sh = m.usage_snapshots, m.host_hours, m.snapshot_hours
    with engine.connect() as conn:
        snap_hosts, snap_metrics = conn.execute(
            sa.select(
                sa.func.coalesce(sa.func.sum(us.c.standard_hosts + us.c.micro_hosts), 0),
                sa.func.coalesce(sa.func.sum(us.c.host_metrics), 0),
            ).where(us.c.hour >= start, us.c.hour < end)
        ).one()
        rows, metrics = conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(hh.c.metric_count), 0))
            .where(hh.c.hour >= start, hh.c.hour < end)
        ).one()
        covered = conn.execute(
            sa.select(sa.func.count()).select_from(sh)
            .where(sh.c.hour >= start, sh.c.hour < end, sh.c.run_id == run_id)
        ).scalar_one()
        conn.rollback()
    return [
        Check(name="snapshot_hosts_equal_host_hours", ok=int(snap_hosts) == int(rows),
              details={"snapshot_hosts": int(snap_hosts), "host_hours": int(rows)}),
        Check(name="snapshot_metrics_equal_host_metrics", ok=int(snap_metrics) == int(metrics),
              details={"snapshot_metrics": int(snap_metrics), "host_metrics": int(metrics)}),
        Check(name="every_hour_snapshotted", ok=int(covered) == hours,
              details={"hours": hours, "snapshotted_by_this_run": int(covered)}),
        Check(name="generated_as_planned", ok=generated.as_planned,
              details={"generated": generated.counts, "planned": generated.planned}),
    ]


def _invoices_check(engine: Engine, period: str, start: datetime, end: datetime,
                    close: CloseTiming) -> Check:
    """Every tenant with a paid hour in the month got exactly one invoice, and nobody else."""
    us, inv = m.usage_snapshots, billing_invoices
    with engine.connect() as conn:
        paying = conn.execute(
            sa.select(sa.func.count(sa.distinct(us.c.tenant_id)))
            .where(us.c.hour >= start, us.c.hour < end, us.c.plan == "standard")
        ).scalar_one()
        invoiced = conn.execute(
            sa.select(sa.func.count()).select_from(inv).where(inv.c.period == period)
        ).scalar_one()
        conn.rollback()
    return Check(name="every_paying_tenant_invoiced",
                 ok=int(paying) == int(invoiced) == close.invoices_written,
                 details={"paying_tenants": int(paying), "invoices": int(invoiced),
                          "written_by_close": close.invoices_written})


# --- the whole bench ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchReport:
    """Everything one bench run measured and checked."""

    tier: BenchTier
    period: str
    billing_tz: str
    database: str
    backend: str
    server_version: str
    start: datetime
    end: datetime
    generated: GenerateResult
    ingest: IngestTiming
    ingest_single: IngestTiming
    snapshot: SnapshotTiming
    close: CloseTiming | None
    checks: list[Check]
    database_counts: dict[str, int]

    @property
    def ok(self) -> bool:
        closed = self.close is None or self.close.status == "succeeded"
        return self.snapshot.status == "succeeded" and closed and all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        t = self.tier
        return {
            "bench": "hostmeter",
            "ok": self.ok,
            "tier": t.name,
            "size": {"tenants": t.tenants, "hosts": t.hosts, "hours": self.snapshot.hours},
            "period": self.period,
            "billing_tz": self.billing_tz,
            "window": [self.start.isoformat(), self.end.isoformat()],
            "backend": self.backend,
            "server_version": self.server_version,
            "database": self.database,
            "python": platform.python_version(),
            "sqlalchemy": sa.__version__,
            "generate": {
                "generate_s": self.generated.generate_s,
                "cleanup_s": self.generated.cleanup_s,
                "steps_s": self.generated.steps_s,
                "rows": self.generated.counts,
            },
            "ingest": {**self.ingest.as_dict(), "single_post_calls": self.ingest_single.as_dict()},
            "snapshot": self.snapshot.as_dict(),
            "close": self.close.as_dict() if self.close else None,
            "counts": self.database_counts,
            "checks": {c.name: {"ok": c.ok, **c.details} for c in self.checks},
        }


def _server_version(engine: Engine) -> str:
    if engine.dialect.name == "sqlite":
        return sqlite3.sqlite_version
    with engine.connect() as conn:
        return str(conn.exec_driver_sql("SHOW server_version").scalar_one())


def run_bench(
    engine: Engine,
    settings: Settings,
    tier: BenchTier,
    *,
    period: str = DEFAULT_PERIOD,
    progress_factory: Progress = progress,
) -> BenchReport:
    """Generate ``tier``'s fleet in ``engine``'s database, time ingest and snapshots, check.

    Raises :class:`BenchRefused` (nothing written) when the database holds non-bench tenants.
    """
    start, month_end = month_bounds(period, settings.zone)
    hour_list = list(hours_between(start, month_end))
    if tier.hours is not None:
        hour_list = hour_list[: tier.hours]
    end = hour_list[-1] + HOUR
    db.ensure_schema(engine)

    generated = generate_fleet(engine, tier, start, len(hour_list),
                               progress_factory=progress_factory)
    ingest, single = time_ingest(engine, tier, start, len(hour_list),
                                 progress_factory=progress_factory)
    snapshot = time_snapshots(engine, settings, hour_list, progress_factory=progress_factory)
    checks = run_checks(engine, start, end, len(hour_list), snapshot.run_id, generated)
    close = None
    if end == month_end:  # a whole month was snapshotted: close it (a partial tier cannot)
        close = time_close(engine, settings, period)
        checks.append(_invoices_check(engine, period, start, end, close))
    with engine.connect() as conn:
        counts = _table_counts(conn)
        us, hh = m.usage_snapshots, m.host_hours
        counts["host_hours_in_window"] = int(conn.execute(
            sa.select(sa.func.count()).select_from(hh).where(hh.c.hour >= start, hh.c.hour < end)
        ).scalar_one())
        counts["usage_snapshots"] = int(conn.execute(
            sa.select(sa.func.count()).select_from(us).where(us.c.hour >= start, us.c.hour < end)
        ).scalar_one())
        conn.rollback()
    report = BenchReport(
        tier=tier, period=period, billing_tz=settings.billing_tz,
        database=db.redact_url(str(engine.url)), backend=engine.dialect.name,
        server_version=_server_version(engine), start=start, end=end, generated=generated,
        ingest=ingest, ingest_single=single, snapshot=snapshot, close=close, checks=checks,
        database_counts=counts,
    )
    structlog.get_logger("hostmeter.bench").info(
        "bench_finished", tier=tier.name, backend=report.backend, ok=report.ok,
        generate_s=generated.generate_s, observations_per_s=report.ingest.as_dict()
        ["observations_per_s"], snapshot_s=report.snapshot.as_dict()["snapshot_s"],
        floor_s=report.snapshot.as_dict()["floor_s"],
        close_s=report.close.as_dict()["close_s"] if report.close else None,
    )
    return report


# --- command line ---------------------------------------------------------------------------


def _settings_and_engine() -> tuple[Settings, Engine]:
    """The ``hostmeter`` group's settings and engine (``--database-url``), else the env's."""
    state = click.get_current_context().find_object(State)
    if state is not None:
        return state.settings, state.engine()  # schema ensured
    settings = Settings.from_env()
    engine = db.create_engine(settings.database_url)
    db.ensure_schema(engine)
    return settings, engine


@click.command("bench")
@click.option("--tier", type=click.Choice(list(TIERS)), default="small", show_default=True,
              help="Fleet size: small (CI) or medium (~2,000 tenants, 30,000 hosts).")
@click.option("--period", default=DEFAULT_PERIOD, show_default=True, metavar="YYYY-MM",
              help="Month to generate and snapshot (in the billing time zone).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the JSON document to FILE.")
def bench_command(tier: str, period: str, out_path: Path | None) -> None:
    """Time ingest and a month of snapshots on a generated fleet; print JSON.

    \b
    WRITES INTO THE CONFIGURED DATABASE: a synthetic fleet (tenants bench-*),
    replacing the previous bench data. Refuses a database that holds any
    other tenant. Exit 1 when a correctness check fails.
    """
    try:
        parse_period(period)  # a bad period fails before any work
    except InvalidWindow as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    settings, engine = _settings_and_engine()
    try:
        report = run_bench(engine, settings, TIERS[tier], period=period)
    except BenchRefused as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    text = json.dumps(report.as_dict(), indent=2)
    click.echo(text)
    if out_path is not None:
        out_path.write_text(text + "\n", encoding="utf-8")
    if not report.ok:
        failed = [c.name for c in report.checks if not c.ok]
        if report.snapshot.status != "succeeded":
            failed.insert(0, f"snapshot-usage {report.snapshot.status}: {report.snapshot.error}")
        fail("bench checks failed: " + "; ".join(failed), EXIT_FAILED)
