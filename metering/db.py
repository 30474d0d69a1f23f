"""The small shared core: metadata, the UTC column type, engines, dialect-specific upserts, schema.

Dependencies flow one way (``jobs → billing → metering``); this module is the bottom of that
chain, so every package's tables hang off :data:`metadata` here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from metering.display import one_line, quote_name
from metering.errors import ConfigError, DatabaseError, SchemaOutOfDate

__all__ = [
    "UTCDateTime",
    "bulk_insert",
    "check_connection",
    "create_engine",
    "current_revision",
    "database_error",
    "describe_error",
    "ensure_schema",
    "head_revision",
    "insert_ignore",
    "metadata",
    "parse_url",
    "password_forms",
    "reading",
    "redact_url",
    "scrub_password",
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


_CREDENTIALS = re.compile(r"^(?P<head>[^:/?#\s]+://[^:/@\s]*):(?P<password>.*)@(?P<tail>[^@]*)$",
                          re.S)


_NO_PASSWORD = re.compile(r"^[^:/?#\s]+://[^:/@\s]*@[^@]*$")  # user@host: nothing to hide


def redact_url(url: str | sa.URL) -> str:
    """The database URL with any password replaced by ``***`` (safe for logs and errors).

    Also for a URL SQLAlchemy cannot parse, or one whose password holds an unencoded ``@``
    (everything up to the last ``@`` is taken for the password).
    """
    if isinstance(url, sa.URL):
        url = url.render_as_string(hide_password=False)
    try:
        parsed = sa.engine.make_url(url)
    except Exception:
        parsed = None
    if parsed is not None and "@" not in (parsed.host or ""):
        if "password" in parsed.query:  # libpq also takes ?password=…
            hidden = parsed.update_query_dict({"password": "REDACTED"})
            return hidden.render_as_string(hide_password=True).replace("REDACTED", "***")
        return parsed.render_as_string(hide_password=True)
    match = _CREDENTIALS.match(url)
    if match is not None:
        return f"{match['head']}:***@{match['tail']}"
    if "@" not in url or _NO_PASSWORD.match(url):
        return url
    return "<unparseable database url>"


def password_forms(url: str | sa.URL | None) -> list[str]:
    """The password of ``url`` as a message may spell it: as given, decoded, percent-encoded."""
    forms: set[str] = set()
    if isinstance(url, str):
        match = _CREDENTIALS.match(url)
        if match:
            forms = {match["password"], unquote(match["password"])}
        try:
            url = sa.engine.make_url(url)
        except Exception:
            url = None
    if url is not None:
        forms |= {str(url.password)} if url.password else set()
        in_query = url.query.get("password")
        forms |= set(in_query) if isinstance(in_query, tuple) else {in_query} if in_query else set()
    forms |= {quote(f, safe="") for f in forms} | {quote_plus(f) for f in forms}
    # longest first, so that a form inside another is not replaced half-way; one or two
    # characters are no secret worth garbling every message for
    return sorted((f for f in forms if len(f) >= 3), key=len, reverse=True)


def scrub_password(text: str, url: str | sa.URL | None) -> str:
    """``text`` with the password of ``url`` (in any of its spellings) replaced by ``***``."""
    for form in password_forms(url):
        text = text.replace(form, "***")
    return text


def _first_line(exc: BaseException) -> str:
    # A SQLAlchemy error's own text appends the SQL, its parameters and a link on later
    # lines; the driver's error (``orig``) holds the reason, on its first line (psycopg puts
    # DETAIL lines, which can quote row values, after it).
    orig = exc.orig if isinstance(exc, sa.exc.StatementError) else None
    text = str(orig if orig is not None else exc)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    for marker in ("[SQL:", "[parameters:", "(Background on this error"):
        first = first.split(marker, 1)[0].rstrip()
    return first


def describe_error(exc: BaseException, *, url: str | sa.URL | None = None,
                   limit: int = 300) -> str:
    """One line naming ``exc``: its class and the first line of its message, cut to ``limit``.

    For a SQLAlchemy error the message is the driver's, so the SQL text, the bound parameters
    (which can carry customer data) and the link SQLAlchemy appends are left out; the password
    of ``url``, should a driver echo it, becomes ``***``. This is the ``error`` of a failed
    run: its ``job_finished`` log line and its ledger row.
    """
    first = _first_line(exc)
    name = type(exc).__name__
    return one_line(scrub_password(f"{name}: {first}" if first else name, url), limit=limit)


def database_error(exc: BaseException, url: str | sa.URL | None = None) -> DatabaseError:
    """A driver or SQLAlchemy failure as a one-line :class:`DatabaseError` that says what to do.

    The translation at the boundary: what reaches an operator names the database (password
    hidden) and the driver's reason, never the SQL text or its parameters.
    """
    reason = describe_error(exc, url=url)
    where = f" {redact_url(url)}" if url is not None else ""
    if getattr(exc, "connection_invalidated", False):
        what = f"lost the connection to the database{where}"
    elif isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        what = f"the database{where} is unavailable"
    else:
        return DatabaseError(f"the database{where} refused a statement ({reason})",
                             reason=reason)
    return DatabaseError(f"{what} ({reason}): check that it is up and reachable, then run the "
                         "command again (work already committed is kept)", reason=reason)


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


URL_HINT = ("set HOSTMETER_DATABASE_URL (or --database-url) to sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE")


def _bad_url(url: str, why: str) -> ConfigError:
    return ConfigError(f"database URL {quote_name(redact_url(url), limit=200)}: {why}; {URL_HINT}",
                       setting="HOSTMETER_DATABASE_URL")


def parse_url(url: str) -> sa.URL:
    """``url`` as the URL of a backend hostmeter runs on, or a one-line :class:`ConfigError`.

    Accepted: ``sqlite:///PATH`` (``sqlite+pysqlite``), and PostgreSQL through psycopg 3 as
    ``postgresql+psycopg://``, ``postgresql://`` or ``postgres://`` (the spelling of libpq and
    of many hosting providers); the last two mean ``postgresql+psycopg``. Anything else (another
    database or driver, a port that is not a number, an ``@`` in the password that is not
    percent-encoded as ``%40``) is a malformed setting, whose message never shows the password.
    """
    scheme, sep, rest = url.partition("://")
    backend, _, driver = scheme.lower().partition("+")
    if sep and backend in ("postgres", "postgresql"):
        # make_url takes everything after the first "@" for the host: the rest of the
        # password would go to DNS and into the error messages
        userinfo = rest.split("?", 1)[0].rpartition("@")[0]
        if "@" in userinfo:
            raise _bad_url(url, "an '@' in the user name or password must be percent-encoded "
                                "as %40")
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise _bad_url(url, "not a database URL") from None
    except ValueError:  # the only int() of the parser: its message would echo the text
        raise _bad_url(url, "the port is not a number") from None
    if backend in ("postgres", "postgresql") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return parsed
    if backend in ("postgres", "postgresql", "sqlite"):
        raise _bad_url(url, f"driver {quote_name(driver)} is not supported (PostgreSQL is "
                            "reached through psycopg 3: postgresql+psycopg://)")
    raise _bad_url(url, f"database {quote_name(backend)} is not supported (hostmeter runs on "
                        "SQLite and PostgreSQL)")


def create_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` (see :func:`parse_url`) with the settings hostmeter relies on.

    Bound parameters are hidden from SQLAlchemy's error messages and tracebacks
    (``hide_parameters``): they carry customer data (tenant, host and metric names).
    """
    parsed = parse_url(url)
    kwargs.setdefault("hide_parameters", True)
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
        raise DatabaseError(f"no driver for {parsed.drivername}: {exc}; "
                            "pip install 'psycopg[binary]'") from exc


def check_connection(engine: Engine) -> None:
    """Connect once, translating a driver failure into a one-line :class:`DatabaseError`."""
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.SQLAlchemyError as exc:
        reason = one_line(scrub_password(_first_line(exc), engine.url), limit=300)
        raise DatabaseError(
            f"cannot connect to {redact_url(engine.url)}: {reason}; check that the database is "
            "up and reachable and that the URL, user and password are right",
            reason=reason,
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


def bulk_insert(conn: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert ``rows`` (no conflict expected) as fast as the backend takes them: PostgreSQL's
    ``COPY … FROM STDIN`` (binary-safe, one round trip per megabytes of rows), SQLite's
    ``executemany`` on the driver, without per-row statement work. Each value goes through its
    column type's bind processing (JSON, timestamps), as in any SQLAlchemy statement. Returns the
    number of rows."""
    if not rows:
        return 0
    columns = list(rows[0])
    quote = conn.dialect.identifier_preparer.quote
    # The dialect's own implementation of each type: on PostgreSQL, JSON binds through the
    # driver's Json wrapper (the generic type has no processor there).
    procs = [table.c[c].type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
             for c in columns]
    if any(procs):
        values: Iterable[tuple[Any, ...]] = (
            tuple(v if p is None or v is None else p(v)
                  for p, v in zip(procs, map(row.get, columns), strict=True))
            for row in rows
        )
    else:
        values = (tuple(map(row.get, columns)) for row in rows)
    names = ", ".join(quote(c) for c in columns)
    if conn.dialect.name != "postgresql":
        marks = ", ".join("?" for _ in columns)
        conn.exec_driver_sql(f"INSERT INTO {quote(table.name)} ({names}) VALUES ({marks})",
                             list(values))
        return len(rows)
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(f"COPY {quote(table.name)} ({names}) FROM STDIN") as copy:
        for row in values:
            copy.write_row(row)
    return len(rows)


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


HEAD_REVISION = "0012"
"""The newest migration's revision, so that a command on an up-to-date database needs no Alembic
to know it (a test holds it equal to what Alembic finds in ``migrations/versions``)."""


def _recorded_revision(engine: Engine) -> str | None:
    """``alembic_version``'s one row read with plain SQL; ``None`` when it cannot be read (no
    table yet, several heads): then Alembic decides."""
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    except sa.exc.SQLAlchemyError:
        return None
    return str(rows[0][0]) if len(rows) == 1 else None


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head", *, now: datetime | None = None) -> None:
    """``alembic upgrade head`` on ``engine`` (what ``hostmeter db upgrade`` runs).

    On PostgreSQL it then creates the monthly partitions of the UTC month of ``now`` (default:
    the clock) and the months after it (:data:`metering.partitions.MONTHS_AHEAD`), as the
    owner that migrations run as, in the same transaction.
    """
    from alembic import command
    from alembic.util import CommandError

    from metering.partitions import ensure_months, months_ahead

    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(connection=conn), revision)
            ensure_months(conn, months_ahead(now or datetime.now(UTC)))
    except CommandError as exc:  # e.g. the database is at a revision this code does not know
        raise DatabaseError(
            f"cannot upgrade {redact_url(engine.url)} to {revision}: {one_line(str(exc))} "
            "(was it migrated by another hostmeter version?)", revision=revision) from exc


def ensure_schema(engine: Engine, *, auto_upgrade: bool | None = None) -> None:
    """Make sure the schema is at head before a command uses it.

    An empty database or the embedded SQLite default is upgraded in place (a new user needs no
    extra step). A PostgreSQL database that already holds an older schema is never migrated
    behind an operator's back: the command fails and names the command to run.
    """
    check_connection(engine)
    if _recorded_revision(engine) == HEAD_REVISION:
        return  # the common case, without loading Alembic and its scripts (~0.15 s a command)
    try:
        current = current_revision(engine)
    except sa.exc.SQLAlchemyError as exc:
        raise database_error(exc, engine.url) from exc
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
