"""Writing a tier's fleet straight into the database with set-based SQL (see the package
docstring for the fleet's shape), and the safety check and cleanup that come first."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from billing.models import billing_runs
from billing.models import invoices as billing_invoices
from jobs.synthetic.bench.tiers import (
    BENCH_PREFIX,
    SNAPSHOT_RUN_PREFIX,
    BenchRefused,
    BenchTier,
    Progress,
    no_progress,
)
from metering import db
from metering import models as m
from metering.ingest import INGEST_LOCK_KEY
from metering.partitions import ensure_months, months_between
from metering.timeutil import HOUR

__all__ = ["GenerateResult", "check_bench_database", "fill_month", "generate_fleet",
           "planned_counts", "table_counts"]

_MAX_METRICS = 512  # above any generated metric_count (standard tops out at 403)

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


def table_counts(conn: Connection) -> dict[str, int]:
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
    progress_factory: Progress = no_progress,
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
            with conn.begin():  # PostgreSQL: the month's partitions, as the hourly job makes them
                ensure_months(conn, months_between(start, start + hours * HOUR))
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
            counts = table_counts(conn)
    return GenerateResult(
        cleanup_s=round(cleanup_s, 3),
        generate_s=round(generate_s, 3),
        steps_s=steps,
        counts=counts,
        planned=planned,
    )


def fill_month(engine: Engine, snapshotted: list[datetime], rest: list[datetime], run_id: str,
               *, progress_factory: Progress = no_progress) -> float:
    """Copy the snapshots of the ``snapshotted`` hours (a day, from real snapshots of recorded
    usage) over the ``rest`` of the month, hour ``i`` from hour ``i mod len(snapshotted)``,
    with their ``snapshot_hours`` rows: per day, one ``INSERT … SELECT`` per table joined to the
    (target, source) hours; returns the seconds.

    The large tier cannot hold a month of ``host_hours`` (216 M rows at 300,000 hosts), but its
    close must read a whole month of snapshots: this gives it one whose every row is a real
    snapshot of the fleet, and whose totals the checks recompute from the rows themselves."""
    us, roles, sh = m.usage_snapshots, m.usage_snapshot_roles, m.snapshot_hours
    pairs = [(hour, snapshotted[i % len(snapshotted)]) for i, hour in enumerate(rest)]
    days = [pairs[i : i + 24] for i in range(0, len(pairs), 24)]
    started = time.perf_counter()
    with progress_factory("fill the month", len(days)) as update, engine.connect() as conn:
        for i, day in enumerate(days):
            hours = (
                sa.values(sa.column("target", us.c.hour.type), sa.column("source", us.c.hour.type),
                          name="fill_hours")
                .data(day)
                .cte("fill_hours")
            )
            with conn.begin():
                for t in (us, roles):
                    conn.execute(sa.insert(t).from_select(
                        [c.name for c in t.c],
                        sa.select(*[hours.c.target if c.name == "hour" else c for c in t.c])
                        .join(hours, t.c.hour == hours.c.source),
                    ))
                conn.execute(sa.insert(sh).from_select(
                    ["hour", "snapshotted_at", "run_id", "tenants"],
                    sa.select(hours.c.target, hours.c.target, sa.literal(run_id), sh.c.tenants)
                    .join(hours, sh.c.hour == hours.c.source),
                ))
            update(i + 1)
        if engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as auto:
                auto.exec_driver_sql("VACUUM ANALYZE usage_snapshots")
    return time.perf_counter() - started


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


