"""What a database holds, comparable across databases: every table's rows with surrogate ids
replaced by natural keys and the columns that record *when* or *by which run* left out.

Two databases built from the same input by the same commands must hold the same
:func:`canonical` content whatever was killed, retried or rolled back in between: a PostgreSQL
sequence hands out new ids after a rolled-back insert, and a retried run has another run id and
clock, but the billing data may not differ. The run ledger and the billing audit record attempts
(a killed run's attempt is history, not data) and are compared by the tests separately.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

import billing.models  # noqa: F401  (registers the billing tables, estimates and outbox too)
import jobs.monitoring.store  # (registers the job-metrics tables)
import jobs.runtime.ledger  # noqa: F401  (registers the run ledger)
from metering import models as m
from metering.db import metadata

__all__ = ["ATTEMPT_TABLES", "VOLATILE", "canonical", "held_advisory_locks", "sqlite_locks_free"]

ATTEMPT_TABLES = frozenset({"job_runs", "billing_runs", "alembic_version"})
"""Tables of attempts (compared by the tests on their own terms), not of data."""

VOLATILE = frozenset({
    "run_id", "started_at", "finished_at", "snapshotted_at", "created_at", "updated_at",
    "finalized_at", "voided_at", "pruned_at", "host", "pid", "deadline", "doubt_until",
    "computed_at", "changed_at", "next_attempt_at", "last_attempt_at", "delivered_at",
})
"""Columns that say when, or by which run, a row was written."""

_KEEP_RUN_ID = frozenset({"log_runs"})  # there the run id comes from the input (the job logs)


def _key_of(table: sa.Table, column: sa.Column[Any], joins: list[Any],
            select: list[Any]) -> sa.FromClause:
    """Replace a foreign-key column by the natural key of the row it points at."""
    (fk,) = column.foreign_keys
    target = fk.column.table.name
    if target == "tenants":
        t = m.tenants.alias(f"t_{column.name}")
        joins.append((t, column == t.c.id))
        select.append(t.c.key.label(f"{column.name}_key"))
    elif target == "hosts":
        h = m.hosts.alias(f"h_{column.name}")
        ht = m.tenants.alias(f"ht_{column.name}")
        joins += [(h, column == h.c.id), (ht, h.c.tenant_id == ht.c.id)]
        select += [ht.c.key.label(f"{column.name}_tenant"), h.c.key.label(f"{column.name}_key")]
    elif target == "invoices":
        inv = metadata.tables["invoices"].alias(f"i_{column.name}")
        it = m.tenants.alias(f"it_{column.name}")
        joins += [(inv, column == inv.c.id), (it, inv.c.tenant_id == it.c.id)]
        select += [it.c.key.label(f"{column.name}_tenant"), inv.c.period, inv.c.revision]
    elif target == "budget_alerts":
        a = metadata.tables["budget_alerts"].alias(f"a_{column.name}")
        at = m.tenants.alias(f"at_{column.name}")
        joins += [(a, column == a.c.id), (at, a.c.tenant_id == at.c.id)]
        select += [at.c.key.label(f"{column.name}_tenant"), a.c.measure]
    elif target == "outbox_events":
        e = metadata.tables["outbox_events"].alias(f"e_{column.name}")
        joins.append((e, column == e.c.id))
        select.append(e.c.event_id.label(f"{column.name}_event"))
    elif target == "webhook_endpoints":
        w = metadata.tables["webhook_endpoints"].alias(f"w_{column.name}")
        joins.append((w, column == w.c.id))
        select.append(w.c.url.label(f"{column.name}_url"))
    else:  # pragma: no cover - a new foreign key: teach this function its natural key
        raise AssertionError(f"{table.name}.{column.name} points at {target}")
    return table


def canonical(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every data table's rows, sorted, without surrogate ids or volatile columns."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            if table.name in ATTEMPT_TABLES:
                continue
            select: list[Any] = []
            joins: list[Any] = []
            for column in table.columns:
                if column.name == "id" or (
                    column.name in VOLATILE
                    and not (column.name == "run_id" and table.name in _KEEP_RUN_ID)
                ):
                    continue
                if column.foreign_keys:
                    _key_of(table, column, joins, select)
                else:
                    select.append(column)
            source: sa.FromClause = table
            for target, on in joins:
                source = source.outerjoin(target, on)
            rows = conn.execute(sa.select(*select).select_from(source)).all()
            out[table.name] = sorted((tuple(_plain(v) for v in r) for r in rows), key=repr)
            if table.name == "outbox_events":  # the body's "created" is when it was written
                out[table.name] = [tuple({k: v for k, v in x.items() if k != "created"}
                                         if isinstance(x, dict) else x for x in r)
                                   for r in out[table.name]]
        conn.rollback()
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def held_advisory_locks(engine: Engine) -> int:
    """Advisory locks held by other sessions of this database (PostgreSQL; 0 elsewhere)."""
    if engine.dialect.name != "postgresql":
        return 0
    with engine.connect() as conn:
        n = conn.execute(sa.text(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND d.datname = current_database() "
            "AND l.pid <> pg_backend_pid() AND l.granted")).scalar_one()
        conn.rollback()
    return int(n)


def sqlite_locks_free(url: str) -> bool:
    """No process holds any of the job-lock files of the SQLite database at ``url`` (a killed
    job's locks are released with its process)."""
    path = sa.engine.make_url(url).database
    folder = Path(f"{path}.locks") if path else None
    if folder is None or not folder.exists():
        return True
    for lock in folder.iterdir():
        with lock.open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(f, fcntl.LOCK_UN)
    return True
