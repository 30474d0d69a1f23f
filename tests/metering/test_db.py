"""The schema, migrations and the small database core, on every backend."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from metering import db
from metering import models as m
from metering.errors import ConfigError, DatabaseError, SchemaOutOfDate
from metering.partitions import include_name
from metering.settings import Settings


def test_upgrade_check_downgrade_upgrade(empty_db_url: str) -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = db.create_engine(empty_db_url)
    db.upgrade(engine)
    assert db.current_revision(engine) == db.head_revision()
    with engine.connect() as conn:
        # as migrations/env.py does: monthly partitions are not tables of the models
        context = MigrationContext.configure(conn, opts={"include_name": include_name})
        diff = compare_metadata(context, db.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"

    with engine.begin() as conn:
        command.downgrade(db.alembic_config(connection=conn), "base")
    assert "usage_snapshots" not in sa.inspect(engine).get_table_names()
    db.upgrade(engine)
    assert "usage_snapshots" in sa.inspect(engine).get_table_names()
    engine.dispose()


def test_constraints_have_stable_names(db_url: str) -> None:
    engine = db.create_engine(db_url)
    insp = sa.inspect(engine)
    assert insp.get_pk_constraint("host_hours")["name"] == "pk_host_hours"
    uniques = {u["name"] for u in insp.get_unique_constraints("hosts")}
    assert "uq_hosts_tenant_id_key" in uniques
    engine.dispose()


def test_ensure_schema_upgrades_an_empty_database(empty_db_url: str) -> None:
    engine = db.create_engine(empty_db_url)
    db.ensure_schema(engine)
    assert db.current_revision(engine) == db.head_revision()
    engine.dispose()


def test_ensure_schema_refuses_to_migrate_an_old_schema_when_not_allowed(
    empty_db_url: str,
) -> None:
    engine = db.create_engine(empty_db_url)
    with engine.begin() as conn:  # a database stamped at an older revision than head
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('0000')")
    with pytest.raises(SchemaOutOfDate, match="run `hostmeter db upgrade`"):
        db.ensure_schema(engine, auto_upgrade=False)
    engine.dispose()


def test_postgresql_with_an_old_schema_is_not_migrated_implicitly(
    empty_db_url: str, backend: str
) -> None:
    if backend != "postgresql":
        pytest.skip("the implicit rule differs on the embedded SQLite file (it upgrades)")
    engine = db.create_engine(empty_db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('0000')")
    with pytest.raises(SchemaOutOfDate, match="hostmeter db upgrade"):
        db.ensure_schema(engine)
    engine.dispose()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_schema_at_an_unknown_revision_is_one_clear_error(empty_db_url: str) -> None:
    engine = db.create_engine(empty_db_url)
    with engine.begin() as conn:  # migrated by another hostmeter version
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('9999')")
    with pytest.raises(DatabaseError) as info:
        db.upgrade(engine)
    assert "Can't locate revision identified by '9999'" in str(info.value)
    assert "\n" not in str(info.value)
    engine.dispose()


def test_unreachable_database_is_one_clear_error() -> None:
    engine = db.create_engine(f"postgresql+psycopg://hm:s3cret@127.0.0.1:{closed_port()}/nope")
    with pytest.raises(DatabaseError) as info:
        db.ensure_schema(engine)
    message = str(info.value)
    assert "cannot connect" in message and "\n" not in message
    assert "s3cret" not in message
    assert "check that the database is up" in message  # says what to do


@pytest.mark.parametrize(("url", "why"), [
    ("mysql://app:pw-secret@127.0.0.1/db", "database 'mysql' is not supported"),
    ("postgresql+nodriver://app:pw-secret@127.0.0.1/db", "driver 'nodriver' is not supported"),
    ("postgresql+psycopg2://app:pw-secret@127.0.0.1/db", "driver 'psycopg2' is not supported"),
    ("postgresql+psycopg://app:pw-secret@127.0.0.1:abc/db", "the port is not a number"),
    ("postgresql+psycopg://app:pw@secret@127.0.0.1/db", "percent-encoded as %40"),
    ("postgresql+psycopg://app:pw@secret@127.0.0.1:5432/db", "percent-encoded as %40"),
    ("postgresql+psycopg://app:pw-x@secret:99@127.0.0.1/db", "percent-encoded as %40"),
    ("hostmeter.db", "not a database URL"),
])
def test_a_malformed_database_url_is_a_one_line_config_error(url: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        db.create_engine(url)
    message = str(info.value)
    assert why in message
    assert "\n" not in message and "secret" not in message
    assert "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE" in message  # what to set
    assert info.value.context["setting"] == "HOSTMETER_DATABASE_URL"


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+psycopg"])
def test_postgres_schemes_mean_psycopg(scheme: str) -> None:
    engine = db.create_engine(f"{scheme}://u:pw@127.0.0.1:{closed_port()}/db")
    assert engine.url.drivername == "postgresql+psycopg" and engine.dialect.driver == "psycopg"
    with pytest.raises(DatabaseError, match="cannot connect"):
        db.check_connection(engine)


def test_a_percent_encoded_at_sign_reaches_the_server_as_an_at_sign() -> None:
    engine = db.create_engine("postgresql+psycopg://app:p%40ss-word@127.0.0.1/db")
    assert engine.url.password == "p@ss-word" and engine.url.host == "127.0.0.1"


def test_sqlite_in_a_missing_directory_is_one_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DatabaseError, match="does not exist"):
        db.create_engine(f"sqlite:///{tmp_path}/no/such/dir/h.db")


def test_redact_url_hides_the_password() -> None:
    assert "s3cret" not in db.redact_url("postgresql+psycopg://u:s3cret@h/db")
    assert "***" in db.redact_url("postgresql+psycopg://u:s3cret@h/db")


@pytest.mark.parametrize(("url", "shown", "password"), [
    ("postgresql+psycopg://app:p@ss-word@127.0.0.1/db",
     "postgresql+psycopg://app:***@127.0.0.1/db", "p@ss-word"),
    ("postgresql+psycopg://app:p%40ss-word@127.0.0.1/db",
     "postgresql+psycopg://app:***@127.0.0.1/db", "p@ss-word"),
    ("postgresql+psycopg://app:ss-word@h:abc/db", "postgresql+psycopg://app:***@h:abc/db",
     "ss-word"),
    ("postgresql://app@h/db?password=ss-word&sslmode=require",
     "postgresql://app@h/db?password=***&sslmode=require", "ss-word"),
])
def test_redact_url_hides_every_spelling_of_a_password(url: str, shown: str,
                                                       password: str) -> None:
    assert db.redact_url(url) == shown
    for spelling in {password, password.replace("@", "%40")}:
        message = f"authentication with {spelling!r} failed"
        assert db.scrub_password(message, url) == "authentication with '***' failed"


def test_driver_errors_are_one_line_without_sql_or_parameters(engine: sa.Engine) -> None:
    customer = "tenant-acme-confidential"
    with engine.begin() as conn:
        conn.execute(sa.insert(m.tenants).values(key=customer))
    with pytest.raises(sa.exc.IntegrityError) as info, engine.begin() as conn:
        conn.execute(sa.insert(m.tenants).values(key=customer))
    # hide_parameters: SQLAlchemy's own text (and so a traceback) shows no bound values
    assert "[parameters:" not in str(info.value) and "parameters hidden" in str(info.value)
    line = db.describe_error(info.value, url=engine.url)
    assert line.startswith("IntegrityError: ") and "\n" not in line
    assert "[SQL" not in line and "parameters" not in line and "INSERT" not in line
    assert customer not in line  # PostgreSQL's DETAIL line quotes the key: it is left out
    error = db.database_error(info.value, engine.url)
    assert isinstance(error, DatabaseError) and customer not in str(error)
    assert "\n" not in str(error) and "[SQL" not in str(error)


def test_instants_round_trip_as_aware_utc(engine: sa.Engine) -> None:
    tokyo = timezone(timedelta(hours=9))
    at = datetime(2026, 10, 15, 0, 0, tzinfo=tokyo)
    with engine.begin() as conn:
        tid = conn.execute(sa.insert(m.tenants).values(key="acme").returning(m.tenants.c.id))
        tenant_id = tid.scalar_one()
        conn.execute(sa.insert(m.plan_changes).values(tenant_id=tenant_id, at=at, plan="standard"))
        stored = conn.execute(sa.select(m.plan_changes.c.at)).scalar_one()
        hit = conn.execute(
            sa.select(sa.func.count()).where(m.plan_changes.c.at == datetime(2026, 10, 14, 15,
                                                                              tzinfo=UTC))
        ).scalar_one()
    assert stored == at and stored.tzinfo is not None and stored.utcoffset() == timedelta(0)
    assert hit == 1


def test_naive_datetimes_are_refused(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        tenant_id = conn.execute(
            sa.insert(m.tenants).values(key="acme").returning(m.tenants.c.id)
        ).scalar_one()
        with pytest.raises(sa.exc.StatementError, match="naive"):
            conn.execute(sa.insert(m.plan_changes).values(
                tenant_id=tenant_id, at=datetime(2026, 10, 1), plan="standard"))


def test_settings_from_environment() -> None:
    s = Settings.from_env({"HOSTMETER_DATABASE_URL": "sqlite:///x.db",
                           "HOSTMETER_BILLING_TZ": "UTC", "HOSTMETER_LOG_DIR": "/tmp/l"})
    assert (s.database_url, s.billing_tz, s.log_dir) == ("sqlite:///x.db", "UTC", "/tmp/l")
    d = Settings.from_env({})
    assert (d.database_url, d.billing_tz, d.log_dir) == (
        "sqlite:///hostmeter.db", "Asia/Tokyo", "logs")
    with pytest.raises(ConfigError, match="HOSTMETER_BILLING_TZ"):
        Settings.from_env({"HOSTMETER_BILLING_TZ": "Mars/Olympus"})


def test_insert_ignore_and_upsert_count_the_rows_they_change(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        assert db.insert_ignore(conn, m.tenants, [{"key": "a"}, {"key": "b"}], key=["key"]) == 2
        assert db.insert_ignore(conn, m.tenants, [{"key": "a"}, {"key": "c"}], key=["key"]) == 1
        tid = conn.execute(sa.select(m.tenants.c.id).where(m.tenants.c.key == "a")).scalar_one()
        at = datetime(2026, 10, 1, tzinfo=UTC)
        rows = [{"tenant_id": tid, "at": at, "plan": "trial"}]
        kw = {"key": ["tenant_id", "at"], "update": ["plan"], "only_if_changed": True}
        assert db.upsert(conn, m.plan_changes, rows, **kw) == 1
        assert db.upsert(conn, m.plan_changes, rows, **kw) == 0
        assert db.upsert(conn, m.plan_changes, [{**rows[0], "plan": "standard"}], **kw) == 1


def test_the_head_revision_constant_is_alembics_head() -> None:
    """ensure_schema trusts HEAD_REVISION to skip Alembic on an up-to-date database: a new
    migration without it would let every command run on a schema one step behind."""
    assert db.head_revision() == db.HEAD_REVISION


def test_an_up_to_date_database_is_checked_without_alembic(db_url: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from metering import db\n"
        f"db.ensure_schema(db.create_engine({db_url!r}))\n"
        "print(any(m == 'alembic' or m.startswith('alembic.') for m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"
