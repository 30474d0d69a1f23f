"""Monthly partitions of host_hours, service_hours and usage_snapshots (PostgreSQL); SQLite keeps
plain tables. Every test runs on both backends and says what it checks on each."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from structlog.testing import capture_logs

from jobs.triggers.runner import RunRequest, execute
from metering import db
from metering import models as m
from metering.ingest import UsageRecorder
from metering.partitions import (
    PARTITIONED,
    ensure_months,
    include_name,
    is_partition_name,
    is_partitioned,
    month_start,
    months_ahead,
    months_between,
    partitions,
)
from metering.records import HostPost, ServicePost
from metering.settings import Settings
from metering.timeutil import hours_between

NOW = datetime(2026, 12, 9, 10, 0, tzinfo=UTC)
TABLES = {name: m.metadata.tables[name] for name in PARTITIONED}


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def rows(engine: Engine, table: str) -> list[tuple[Any, ...]]:
    t = TABLES[table]
    with engine.connect() as conn:
        pk = [c for c in t.primary_key.columns]
        return [tuple(r) for r in conn.execute(sa.select(t).order_by(*pk))]


def all_rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    return {table: rows(engine, table) for table in PARTITIONED}


def partitioned_tables(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.exec_driver_sql(
            "SELECT c.relname FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid"
        ).scalars())


def where_rows_are(engine: Engine, table: str) -> dict[datetime, str]:
    """hour → the partition holding it (PostgreSQL)."""
    with engine.connect() as conn:
        return {hour.astimezone(UTC): part for hour, part in conn.exec_driver_sql(
            f"SELECT hour, tableoid::regclass::text FROM {table}")}


def months(engine: Engine, table: str) -> list[datetime | None]:
    with engine.connect() as conn:
        return [p.start for p in partitions(conn, table)]


# Hours either side of a UTC month boundary (and of the Tokyo one, 15:00Z the day before), and
# one in a far-future month.
SEED_HOURS = [utc(2025, 11, 30, 14), utc(2025, 11, 30, 23), utc(2025, 12, 1, 0),
              utc(2025, 12, 31, 23), utc(2030, 1, 15, 10)]


def seed_plain(engine: Engine) -> None:
    """Rows in the three tables, written straight (the schema at 0009 has no partitions)."""
    with engine.begin() as conn:
        for key in ("acme", "zen"):
            conn.execute(sa.insert(m.tenants).values(key=key))
        tenants = dict(conn.execute(sa.select(m.tenants.c.key, m.tenants.c.id)).all())
        for key in ("h-1", "h-2"):
            conn.execute(sa.insert(m.hosts).values(tenant_id=tenants["acme"], key=key))
        hosts = dict(conn.execute(sa.select(m.hosts.c.key, m.hosts.c.id)).all())
        for i, hour in enumerate(SEED_HOURS):
            for host in ("h-1", "h-2"):
                conn.execute(sa.insert(m.host_hours).values(
                    host_id=hosts[host], hour=hour, tenant_id=tenants["acme"],
                    kind="standard" if host == "h-1" else "micro", metric_count=i + 1,
                    metric_bits=bytes([i + 1, 0xFF])))
            for tenant in ("acme", "zen"):
                conn.execute(sa.insert(m.service_hours).values(
                    tenant_id=tenants[tenant], hour=hour, metric_count=i,
                    metric_bits=bytes([i])))
                conn.execute(sa.insert(m.usage_snapshots).values(
                    tenant_id=tenants[tenant], hour=hour, plan="standard", standard_hosts=1,
                    micro_hosts=1, standard_overage=i, micro_overage=0, host_metrics=2 * i,
                    service_metrics=i, monitors=0, standard_metric_limit=200,
                    micro_metric_limit=30))


def assert_constraints_enforced(engine: Engine) -> None:
    """Primary keys (which include ``hour``), foreign keys and checks still refuse bad rows."""
    hour = SEED_HOURS[2]
    with engine.connect() as conn:
        host = conn.execute(sa.select(m.host_hours).where(m.host_hours.c.hour == hour)).first()
        snap = conn.execute(sa.select(m.usage_snapshots)
                            .where(m.usage_snapshots.c.hour == hour)).first()
        service = conn.execute(sa.select(m.service_hours)
                               .where(m.service_hours.c.hour == hour)).first()
    assert host is not None and snap is not None and service is not None
    bad = [
        (m.host_hours, host._asdict()),  # duplicate primary key
        (m.service_hours, service._asdict()),
        (m.usage_snapshots, snap._asdict()),
        (m.host_hours, {**host._asdict(), "hour": utc(2031, 1, 1), "host_id": 999_999}),  # FK
        (m.usage_snapshots, {**snap._asdict(), "hour": utc(2031, 1, 1), "tenant_id": 999_999}),
        (m.host_hours, {**host._asdict(), "hour": utc(2031, 1, 1), "kind": "huge"}),  # check
    ]
    for table, row in bad:
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(sa.insert(table).values(**row))


def test_upgrade_from_0009_keeps_every_row_then_downgrade_and_back(empty_db_url: str,
                                                                   backend: str) -> None:
    from alembic import command

    engine = db.create_engine(empty_db_url)
    db.upgrade(engine, "0009", now=NOW)
    seed_plain(engine)
    before = all_rows(engine)
    assert all(len(v) == 10 for v in before.values())

    db.upgrade(engine, now=NOW)
    assert all_rows(engine) == before
    if backend == "postgresql":
        with engine.connect() as conn:
            clock = conn.exec_driver_sql("SELECT now()").scalar_one()
        assert partitioned_tables(engine) == set(PARTITIONED)
        for table in PARTITIONED:
            # a partition per month in the data, the current month and three ahead (by the
            # database's clock in the migration, by ``now`` in db.upgrade), and a default
            expected = {utc(2025, 11, 1), utc(2025, 12, 1), utc(2030, 1, 1),
                        *months_ahead(clock, 3), *months_ahead(NOW, 3)}
            assert months(engine, table) == [*sorted(expected), None]
            placed = where_rows_are(engine, table)
            assert placed[utc(2025, 11, 30, 23)] == f"{table}_p2025_11"
            assert placed[utc(2025, 12, 1, 0)] == f"{table}_p2025_12"
            assert placed[utc(2030, 1, 15, 10)] == f"{table}_p2030_01"
            indexes = {i["name"] for i in sa.inspect(engine).get_indexes(table)}
            assert {i.name for i in TABLES[table].indexes} <= indexes
            assert sa.inspect(engine).get_pk_constraint(table)["name"] == f"pk_{table}"
    else:
        with engine.connect() as conn:
            names = set(conn.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type = 'table'").scalars())
            assert not any(is_partitioned(conn, t) for t in PARTITIONED)
        assert set(PARTITIONED) <= names and not any(is_partition_name(n) for n in names)
    assert_constraints_enforced(engine)

    with engine.begin() as conn:
        command.downgrade(db.alembic_config(connection=conn), "0009")
    assert all_rows(engine) == before
    if backend == "postgresql":
        assert partitioned_tables(engine) == set()
    assert_constraints_enforced(engine)

    db.upgrade(engine, now=NOW)
    assert all_rows(engine) == before
    if backend == "postgresql":
        assert partitioned_tables(engine) == set(PARTITIONED)
    assert_constraints_enforced(engine)
    engine.dispose()


def test_alembic_leaves_partitions_out_of_the_models_comparison() -> None:
    assert not include_name("host_hours_p2026_10", "table", {})
    assert not include_name("usage_snapshots_default", "table", {})
    assert include_name("host_hours", "table", {})
    assert include_name("hosts_p2026_10", "table", {})  # not one of ours
    assert include_name("host_hours_p2026_13", "table", {})


def record_far_future(engine: Engine, hour: datetime) -> None:
    UsageRecorder(engine).record([
        HostPost(tenant="acme", host="h-1", kind="standard", at=hour + timedelta(minutes=3),
                 metrics=("cpu", "mem")),
        ServicePost(tenant="acme", service="web", at=hour, metrics=("req",)),
    ])


def test_a_month_without_partition_is_accepted_and_moved_in_when_created(
        engine: Engine, backend: str) -> None:
    hour = utc(2040, 5, 3, 10)
    record_far_future(engine, hour)  # ingest as it is: no partition for May 2040 exists
    before = all_rows(engine)
    assert len(before["host_hours"]) == 1 and len(before["service_hours"]) == 1
    if backend == "postgresql":
        assert where_rows_are(engine, "host_hours") == {hour: "host_hours_default"}
        assert where_rows_are(engine, "service_hours") == {hour: "service_hours_default"}

    with engine.begin() as conn:
        result = ensure_months(conn, [hour])
    assert all_rows(engine) == before
    if backend == "postgresql":
        assert {p.name for p in result.created} == {f"{t}_p2040_05" for t in PARTITIONED}
        assert result.moved_rows == 2 and result.skipped is None
        assert where_rows_are(engine, "host_hours") == {hour: "host_hours_p2040_05"}
        assert where_rows_are(engine, "service_hours") == {hour: "service_hours_p2040_05"}
        # a later post for that month goes straight into its partition
        record_far_future(engine, hour + timedelta(hours=1))
        assert set(where_rows_are(engine, "host_hours").values()) == {"host_hours_p2040_05"}
    else:
        assert result.created == () and result.moved_rows == 0


def test_ensure_months_twice_is_a_no_op(engine: Engine, backend: str) -> None:
    wanted = months_ahead(utc(2033, 11, 20, 5), 2)
    assert wanted == [utc(2033, 11, 1), utc(2033, 12, 1), utc(2034, 1, 1)]
    with engine.begin() as conn:
        first = ensure_months(conn, [*wanted, wanted[0] + timedelta(days=3)])
    listed = {t: months(engine, t) for t in PARTITIONED}
    with engine.begin() as conn:
        second = ensure_months(conn, wanted)
    assert second.created == () and second.skipped is None
    assert {t: months(engine, t) for t in PARTITIONED} == listed
    if backend == "postgresql":
        assert len(first.created) == 9  # three months of three tables, each once
        for table in PARTITIONED:
            assert set(wanted) <= set(listed[table])
    else:
        assert first.created == () and listed == {t: [] for t in PARTITIONED}


def test_two_concurrent_ensures_both_succeed(engine: Engine, backend: str) -> None:
    """A holds its new partitions uncommitted while B starts: B must wait, look again and
    find them (without the lock and the second look it would create them twice and fail)."""
    wanted = [utc(2036, 2, 1), utc(2036, 3, 1)]
    record_far_future(engine, utc(2036, 2, 10, 1))  # a row in the default to move, too
    created: dict[str, int] = {}
    errors: list[BaseException] = []
    a_created = threading.Event()

    def a() -> None:
        try:
            with engine.begin() as conn:
                created["a"] = len(ensure_months(conn, wanted).created)
                a_created.set()
                threading.Event().wait(0.5)  # B is waiting on us now
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            a_created.set()

    def b() -> None:
        a_created.wait(10)
        try:
            with engine.begin() as conn:
                created["b"] = len(ensure_months(conn, wanted).created)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    if backend == "postgresql":
        assert created == {"a": 6, "b": 0}
        assert where_rows_are(engine, "host_hours") == {utc(2036, 2, 10, 1):
                                                        "host_hours_p2036_02"}
    else:
        assert created == {"a": 0, "b": 0}
    assert len(rows(engine, "host_hours")) == 1


def test_the_hourly_job_and_db_upgrade_create_months_ahead(engine: Engine, db_url: str,
                                                           backend: str) -> None:
    settings = Settings(database_url=db_url)
    at = utc(2031, 2, 10, 10, 5)
    out = execute(engine, settings, RunRequest(job="snapshot-usage", scheduled_time=at))
    assert out.status == "succeeded"
    db.upgrade(engine, now=utc(2032, 6, 30, 23))
    for table in PARTITIONED:
        have = set(months(engine, table))
        if backend == "postgresql":
            assert {utc(2031, 2, 1), utc(2031, 3, 1), utc(2031, 4, 1), utc(2031, 5, 1)} <= have
            assert {utc(2032, 6, 1), utc(2032, 9, 1)} <= have and utc(2032, 10, 1) not in have
        else:
            assert have == set()


def test_month_start_is_the_utc_month() -> None:
    tokyo_first = datetime.fromisoformat("2026-11-01T05:00:00+09:00")  # still October in UTC
    assert month_start(tokyo_first) == utc(2026, 10, 1)
    assert months_ahead(utc(2026, 12, 31, 23), 1) == [utc(2026, 12, 1), utc(2027, 1, 1)]
    assert months_between(utc(2026, 9, 30, 15), utc(2026, 11, 30, 15)) == [
        utc(2026, 9, 1), utc(2026, 10, 1), utc(2026, 11, 1)]
    assert months_between(utc(2026, 9, 30, 15), utc(2026, 10, 1)) == [utc(2026, 9, 1)]
    with pytest.raises(ValueError, match="naive"):
        month_start(datetime(2026, 10, 1))


# --- prune ------------------------------------------------------------------------------------

# The prune job at this time has the cut-off 2026-09-30T15:00Z (the start of October in Tokyo):
# UTC July and August lie wholly before it, September does not.
PRUNE_AT = utc(2027, 11, 20, 4, 30)
CUTOFF = utc(2026, 9, 30, 15)
UNSNAPSHOTTED = utc(2026, 8, 20, 7)  # August keeps this hour, so its partition stays


def seed_for_prune(engine: Engine) -> list[datetime]:
    hours = [*hours_between(utc(2026, 6, 29), utc(2026, 10, 3))]
    recs: list[Any] = []
    for h in hours:
        recs.append(HostPost(tenant="acme", host="h-1", kind="standard",
                             at=h + timedelta(minutes=1), metrics=("cpu",)))
        recs.append(ServicePost(tenant="acme", service="web", at=h, metrics=("req",)))
    UsageRecorder(engine).record(recs)
    with engine.begin() as conn:
        # July to October get partitions; the last days of June stay in the default partition.
        ensure_months(conn, [utc(2026, 7, 1), utc(2026, 8, 1), utc(2026, 9, 1),
                             utc(2026, 10, 1)])
        conn.execute(sa.insert(m.snapshot_hours), [
            {"hour": h, "snapshotted_at": h, "run_id": "seed", "tenants": 1}
            for h in hours if h != UNSNAPSHOTTED])
    return hours


def hours_left(engine: Engine, table: sa.Table) -> list[datetime]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(table.c.hour).order_by(table.c.hour)).scalars())


@pytest.fixture
def seeded_for_prune(engine: Engine) -> Iterator[list[datetime]]:
    yield seed_for_prune(engine)


def test_prune_drops_whole_old_months_and_deletes_only_the_right_rows(
        engine: Engine, db_url: str, backend: str, seeded_for_prune: list[datetime]) -> None:
    hours = seeded_for_prune
    kept = [h for h in hours if h >= CUTOFF or h == UNSNAPSHOTTED]
    gone = len(hours) - len(kept)
    if backend == "postgresql":
        assert where_rows_are(engine, "host_hours")[utc(2026, 6, 30, 5)] == "host_hours_default"

    settings = Settings(database_url=db_url)
    out = execute(engine, settings, RunRequest(job="prune-usage", scheduled_time=PRUNE_AT))
    assert out.status == "succeeded" and out.counts["cutoff"] == CUTOFF.isoformat()
    # rows removed, whether by dropping their partition or by DELETE
    assert out.counts["host_hours_deleted"] == gone
    assert out.counts["service_hours_deleted"] == gone
    assert hours_left(engine, m.host_hours) == kept
    assert hours_left(engine, m.service_hours) == kept
    if backend == "postgresql":
        assert out.counts["partitions_dropped"] == 2  # July of host_hours and service_hours
        for table in ("host_hours", "service_hours"):
            assert months(engine, table)[:3] == [utc(2026, 8, 1), utc(2026, 9, 1),
                                                 utc(2026, 10, 1)]
        assert utc(2026, 7, 1) in months(engine, "usage_snapshots")  # snapshots are never pruned
    else:
        assert out.counts["partitions_dropped"] == 0

    again = execute(engine, settings, RunRequest(job="prune-usage", scheduled_time=PRUNE_AT,
                                                 force=True))
    assert again.counts["host_hours_deleted"] == 0 and again.counts["partitions_dropped"] == 0
    assert hours_left(engine, m.host_hours) == kept


def test_prune_deletes_rows_when_it_cannot_lock_the_table_in_time(
        engine: Engine, backend: str, seeded_for_prune: list[datetime]) -> None:
    if backend != "postgresql":
        pytest.skip("table locks and partitions are PostgreSQL's")
    from metering.retention import prune

    hours = seeded_for_prune
    kept = [h for h in hours if h >= CUTOFF or h == UNSNAPSHOTTED]
    reader = engine.connect()  # a long reader: DROP would queue every query behind it
    reader.execute(sa.select(sa.func.count()).select_from(m.host_hours)).scalar_one()
    try:
        with engine.begin() as conn:
            result = prune(conn, CUTOFF, now=PRUNE_AT, lock_timeout=0.2)
    finally:
        reader.rollback()
        reader.close()
    assert result.partitions_skipped == "lock_timeout" and result.partitions_dropped == 0
    assert result.host_hours == len(hours) - len(kept)
    assert hours_left(engine, m.host_hours) == kept
    assert utc(2026, 7, 1) in months(engine, "host_hours")  # emptied, not dropped
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar_one() == "0"


def _as_role(conn: Connection, role: str) -> None:
    conn.exec_driver_sql(f"SET LOCAL ROLE {role}")  # this transaction only


def test_a_role_that_does_not_own_the_tables_skips_partitions_and_still_works(
        engine: Engine, backend: str, seeded_for_prune: list[datetime]) -> None:
    if backend != "postgresql":
        pytest.skip("SQLite has no roles")
    import uuid

    from metering.grants import grant_runtime_role
    from metering.retention import prune

    role = f"hm_rt_{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
    runtime = db.create_engine(engine.url.set(username=role, password=None)
                               .render_as_string(False))
    try:
        grant_runtime_role(engine, role)
        hours = seeded_for_prune
        with engine.begin() as conn:
            _as_role(conn, role)
            assert ensure_months(conn, [utc(2045, 1, 1)]).skipped == "not_owner"
            result = prune(conn, CUTOFF, now=PRUNE_AT)
        assert result.partitions_skipped == "not_owner"
        assert result.host_hours == len([h for h in hours if h < CUTOFF]) - 1
        assert utc(2045, 1, 1) not in months(engine, "host_hours")

        # The hourly job as that role: it succeeds, and says which months have no partition.
        with capture_logs() as logs:
            out = execute(runtime, Settings(database_url=str(runtime.url)),
                          RunRequest(job="snapshot-usage", scheduled_time=utc(2045, 1, 1, 2, 5)))
        assert out.status == "succeeded"
        warned = [e for e in logs if e["event"] == "partitions_not_created"]
        assert {(e["table"], e["log_level"], e["reason"], tuple(e["months"])) for e in warned} == {
            (t, "warning", "not_owner", ("2044-12", "2045-01")) for t in PARTITIONED}
    finally:
        runtime.dispose()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")
