"""The small shared core: metadata, the UTC column type, engines, dialect-specific upserts, schema.

Dependencies flow one way (``jobs → billing → metering``); this module is the bottom of that
chain, so every package's tables hang off :data:`metadata` here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from metering.errors import DatabaseError, SchemaOutOfDate

__all__ = [
    "UTCDateTime",
    "create_engine",
    "current_revision",
    "ensure_schema",
    "head_revision",
    "insert_ignore",
    "metadata",
    "reading",
    "redact_url",
    "upgrade",
    "upsert",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """An instant stored as UTC on every backend and always read back as aware UTC.

    PostgreSQL keeps ``timestamptz``; SQLite has no zone-aware type, so the naive UTC value is
    stored (in SQLAlchemy's fixed-width text form, which sorts and compares correctly).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"refusing to store naive datetime {value!r}: instants are UTC-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def redact_url(url: str) -> str:
    """The database URL with any password replaced by ``***`` (safe for logs and errors)."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database url>"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


READ_ONLY = {"hostmeter_read_only": True}
"""Execution options for a connection that only reads (see :func:`reading`)."""


def _sqlite_begin(conn: Connection) -> None:
    # Writers take the write lock up front: two writers then queue on busy_timeout instead of
    # failing with SQLITE_BUSY when a reader tries to upgrade, and a transaction is one unit
    # across processes (this is how SQLite keeps concurrent jobs from interleaving). Readers
    # begin deferred and, in WAL mode, never wait for a writer.
    if conn.get_execution_options().get("hostmeter_read_only"):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def reading(engine: Engine) -> Connection:
    """A connection for reads only: on SQLite it does not wait for (or block) writers."""
    return engine.connect().execution_options(**READ_ONLY)


def create_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the settings hostmeter relies on for each backend."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise DatabaseError(f"HOSTMETER_DATABASE_URL is not a database URL: {exc}") from exc
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            parent = Path(parsed.database).expanduser().resolve().parent
            if not parent.is_dir():
                raise DatabaseError(
                    f"cannot open {redact_url(url)}: directory {parent} does not exist"
                )
        engine = sa.create_engine(parsed, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    # TCP keepalives: a session that holds a run's advisory lock sits idle for the whole run,
    # and must not be dropped by a middlebox meanwhile.
    kwargs.setdefault("connect_args", {"connect_timeout": 10, "keepalives": 1,
                                       "keepalives_idle": 30, "keepalives_interval": 10,
                                       "keepalives_count": 5})
    try:
        return sa.create_engine(parsed, **kwargs)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DatabaseError(f"no driver for {parsed.drivername}: {exc}") from exc


def check_connection(engine: Engine) -> None:
    """Connect once, translating a driver failure into a one-line :class:`DatabaseError`."""
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise DatabaseError(
            f"cannot connect to {redact_url(str(engine.url))}: {reason}"
        ) from exc


# --- dialect-specific inserts -------------------------------------------------------------


def _insert(conn: Connection, table: sa.Table) -> Any:
    # The dialect modules are imported here, not with this module: a process imports only the
    # backend it talks to (its engine has already loaded it), and importing metering stays cheap.
    name = conn.dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    if name == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(table)
    raise DatabaseError(f"unsupported database backend {name!r} (use SQLite or PostgreSQL)")


_ROWS_PER_STATEMENT = 500  # multi-row VALUES, well under SQLite's bound-parameter limit


def _execute_values(conn: Connection, stmt: Any, rows: Sequence[Mapping[str, Any]]) -> int:
    """Run ``stmt`` as multi-row ``VALUES`` statements; returns the rows it really changed."""
    changed = 0
    for i in range(0, len(rows), _ROWS_PER_STATEMENT):
        # rowcount of an INSERT is only kept on request (SQLAlchemy's preserve_rowcount)
        result = conn.execute(stmt.values(list(rows[i : i + _ROWS_PER_STATEMENT]))
                              .execution_options(preserve_rowcount=True))
        changed += max(result.rowcount, 0)
    return changed


def insert_ignore(
    conn: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]], *, key: Sequence[str]
) -> int:
    """Insert ``rows``, keeping the existing row where ``key`` already exists.

    Returns the number of rows inserted.
    """
    if not rows:
        return 0
    return _execute_values(
        conn, _insert(conn, table).on_conflict_do_nothing(index_elements=list(key)), rows
    )


def upsert(
    conn: Connection,
    table: sa.Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    key: Sequence[str],
    update: Iterable[str],
    only_if_changed: bool = False,
) -> int:
    """Insert ``rows``; where ``key`` exists, overwrite the ``update`` columns.

    With ``only_if_changed`` an existing row whose ``update`` columns already hold the new values
    is left alone (and not counted). Returns the number of rows inserted or updated.
    """
    if not rows:
        return 0
    columns = list(update)
    stmt = _insert(conn, table)
    where = None
    if only_if_changed:
        where = sa.or_(*[table.c[c].is_distinct_from(stmt.excluded[c]) for c in columns])
    stmt = stmt.on_conflict_do_update(
        index_elements=list(key), set_={c: stmt.excluded[c] for c in columns}, where=where
    )
    if only_if_changed:
        return _execute_values(conn, stmt, rows)
    conn.execute(stmt, rows)  # executemany: every row is written, so every row counts
    return len(rows)


# --- schema -------------------------------------------------------------------------------

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """``alembic upgrade head`` on ``engine`` (what ``hostmeter db upgrade`` runs)."""
    from alembic import command

    with engine.begin() as conn:
        command.upgrade(alembic_config(connection=conn), revision)


def ensure_schema(engine: Engine, *, auto_upgrade: bool | None = None) -> None:
    """Make sure the schema is at head before a command uses it.

    An empty database or the embedded SQLite default is upgraded in place (a new user needs no
    extra step). A PostgreSQL database that already holds an older schema is never migrated
    behind an operator's back: the command fails and names the command to run.
    """
    check_connection(engine)
    try:
        current = current_revision(engine)
    except sa.exc.SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the schema version: {exc}") from exc
    head = head_revision()
    if current == head:
        return
    if auto_upgrade is None:
        auto_upgrade = engine.dialect.name == "sqlite" or current is None
        if os.environ.get("HOSTMETER_AUTO_UPGRADE") == "0":
            auto_upgrade = False
    if not auto_upgrade:
        raise SchemaOutOfDate(
            f"database schema is at {current or 'nothing'}, this hostmeter needs {head}: "
            "run `hostmeter db upgrade`",
            current=current,
            head=head,
        )
    upgrade(engine)
