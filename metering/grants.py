"""The PostgreSQL runtime role: the jobs run as a role that does not own the tables.

Final and void invoices are sealed by triggers (migrations 0002 and 0007), but a table's owner
may disable or drop its triggers, and truncate it. So production uses two roles:

- the **migration owner** owns the schema: it runs ``hostmeter db upgrade`` (and this grant),
  and nothing else;
- the **runtime role** — every scheduled job, the CLI's billing commands, the Lambda handler —
  gets only ``SELECT, INSERT, UPDATE, DELETE`` on the tables (``SELECT`` on
  ``alembic_version``) and the sequences it needs, through :func:`grant_runtime_role`: no
  ownership, no ``TRUNCATE``, no ``TRIGGER``, no DDL. It cannot disable a trigger, truncate a
  table or drop one, so a final invoice stays as it is whatever SQL it sends.

Default privileges cover the tables later migrations create (as long as the owner runs them).
SQLite has no roles: there the triggers guard against every statement, but anyone who can write
the file can drop them.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from metering.errors import ConfigError

__all__ = ["RoleCheck", "check_runtime_role", "grant_runtime_role"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RoleCheck:
    """Whether the connected role could unseal final invoices (owns or may alter the tables)."""

    role: str
    superuser: bool
    owns_invoices: bool

    @property
    def sealed(self) -> bool:
        return not (self.superuser or self.owns_invoices)


def _postgres(engine: Engine, what: str) -> None:
    if engine.dialect.name != "postgresql":
        raise ConfigError(f"{what} is for PostgreSQL; SQLite has no roles",
                          backend=engine.dialect.name)


def grant_runtime_role(engine: Engine, role: str) -> list[str]:
    """Grant ``role`` what the jobs need and nothing more; returns the statements run.

    Run as the migration owner, after ``hostmeter db upgrade``. Refuses a role that does not
    exist, a superuser (it bypasses everything), and the owner itself.
    """
    _postgres(engine, "db grant")
    with engine.begin() as conn:
        row = conn.execute(sa.text("SELECT rolsuper FROM pg_roles WHERE rolname = :r"),
                           {"r": role}).one_or_none()
        if row is None:
            raise ConfigError(f"role {role!r} does not exist: CREATE ROLE {role} LOGIN PASSWORD "
                              "'…' first", role=role)
        if row.rolsuper:
            raise ConfigError(f"role {role!r} is a superuser: it could unseal final invoices; "
                              "use a plain LOGIN role", role=role)
        owner = conn.execute(sa.text(
            "SELECT tableowner FROM pg_tables WHERE schemaname = current_schema() "
            "AND tablename = 'invoices'")).scalar_one_or_none()
        if owner is None:
            raise ConfigError("no invoices table here: run `hostmeter db upgrade` first")
        if owner == role:
            raise ConfigError(f"role {role!r} owns the tables: the runtime role must be another "
                              "role (the owner only migrates)", role=role)
        q = conn.dialect.identifier_preparer.quote(role)
        statements = [
            f"GRANT USAGE ON SCHEMA current_schema TO {q}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA current_schema TO {q}",
            f"REVOKE INSERT, UPDATE, DELETE ON alembic_version FROM {q}",
            f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA current_schema TO {q}",
            "ALTER DEFAULT PRIVILEGES IN SCHEMA current_schema "
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {q}",
            "ALTER DEFAULT PRIVILEGES IN SCHEMA current_schema "
            f"GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {q}",
        ]
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
        qs = conn.dialect.identifier_preparer.quote(schema)
        statements = [s.replace("current_schema", qs) for s in statements]
        for statement in statements:
            conn.exec_driver_sql(statement)
    return statements


def check_runtime_role(engine: Engine) -> RoleCheck:
    """Who this engine connects as, and whether that role could unseal final invoices."""
    _postgres(engine, "the runtime role check")
    with engine.connect() as conn:
        row = conn.execute(sa.text(
            "SELECT current_user AS role, r.rolsuper AS superuser, "
            "       coalesce(pg_has_role(current_user, t.tableowner, 'USAGE'), false) AS owns "
            "  FROM pg_roles r LEFT JOIN pg_tables t "
            "    ON t.schemaname = current_schema() AND t.tablename = 'invoices' "
            " WHERE r.rolname = current_user")).one()
        conn.rollback()
    return RoleCheck(role=row.role, superuser=bool(row.superuser), owns_invoices=bool(row.owns))
