"""Monthly range partitions for host_hours, service_hours and usage_snapshots (PostgreSQL).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-09 10:00:00.000000

On PostgreSQL each table is converted in place, keeping every row, its primary key (which
includes ``hour``, as a partitioned table's must), its foreign keys, check constraints and
indexes under the same names:

1. the plain table is renamed ``<table>_plain`` (its primary key and index too, since those
   names are schema-wide);
2. ``<table>`` is created ``LIKE`` it (columns, defaults, NOT NULL and checks) and
   ``PARTITION BY RANGE (hour)``;
3. one partition per UTC month present in the data, plus the current UTC month and the three
   after it, and a DEFAULT partition that takes any row of a month without a partition (so no
   write ever fails for want of one);
4. the rows are copied, then the primary key, foreign keys and indexes are built (once, over
   the loaded data, rather than row by row), and the plain table is dropped.

``hour`` is a ``timestamptz``: partitions are UTC calendar months, ``[YYYY-MM-01 00:00Z, next
month)``, named ``<table>_pYYYY_MM``; the default is ``<table>_default``. Later months are
created ahead by ``metering.partitions.ensure_months`` (``hostmeter db upgrade`` and the hourly
``snapshot-usage`` job). The conversion locks the three tables and copies them once: on a large
database, run it in a quiet window.

Downgrade converts them back to plain tables with all their rows. SQLite keeps plain tables:
this revision does nothing there.
"""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

MONTHS_AHEAD = 3

# table → (primary key columns, [(foreign key name, column, referenced table)], [(index, columns)])
TABLES = {
    'host_hours': (
        'host_id, hour',
        [('fk_host_hours_host_id_hosts', 'host_id', 'hosts'),
         ('fk_host_hours_tenant_id_tenants', 'tenant_id', 'tenants')],
        [('ix_host_hours_hour_tenant', 'hour, tenant_id')],
    ),
    'service_hours': (
        'tenant_id, hour',
        [('fk_service_hours_tenant_id_tenants', 'tenant_id', 'tenants')],
        [('ix_service_hours_hour', 'hour')],
    ),
    'usage_snapshots': (
        'tenant_id, hour',
        [('fk_usage_snapshots_tenant_id_tenants', 'tenant_id', 'tenants')],
        [('ix_usage_snapshots_hour', 'hour')],
    ),
}


def _postgres() -> bool:
    return op.get_bind().dialect.name == 'postgresql'


def _sql(statement: str) -> None:
    op.get_bind().exec_driver_sql(statement)


def _next_month(month: datetime) -> datetime | None:
    if (month.year, month.month) == (9999, 12):
        return None
    year, index = divmod(month.month, 12)
    return datetime(month.year + year, index + 1, 1, tzinfo=UTC)


def _months(table: str) -> list[datetime]:
    """The UTC months holding rows of ``table``, the current one and MONTHS_AHEAD after it."""
    bind = op.get_bind()
    rows = bind.exec_driver_sql(
        f"SELECT DISTINCT date_trunc('month', hour, 'UTC') FROM {table}").scalars()
    months = {month.astimezone(UTC) for month in rows}
    ahead = bind.exec_driver_sql("SELECT date_trunc('month', now(), 'UTC')").scalar_one()
    ahead = ahead.astimezone(UTC)
    months.add(ahead)
    for _ in range(MONTHS_AHEAD):
        following = _next_month(ahead)
        if following is None:
            break
        ahead = following
        months.add(ahead)
    return sorted(months)


def _bound(instant: datetime | None) -> str:
    return 'MAXVALUE' if instant is None else f"('{instant.isoformat()}')"


def _set_aside(table: str, suffix: str) -> None:
    """Rename ``table`` and its schema-wide names (primary key, indexes) out of the way."""
    _pk, _fks, indexes = TABLES[table]
    _sql(f'ALTER TABLE {table} RENAME TO {table}_{suffix}')
    _sql(f'ALTER TABLE {table}_{suffix} RENAME CONSTRAINT pk_{table} TO pk_{table}_{suffix}')
    for index, _columns in indexes:
        _sql(f'ALTER INDEX {index} RENAME TO {index}_{suffix}')


def _constrain(table: str) -> None:
    """Primary key, foreign keys and indexes of ``table``, built over the rows it holds."""
    pk, fks, indexes = TABLES[table]
    _sql(f'ALTER TABLE {table} ADD CONSTRAINT pk_{table} PRIMARY KEY ({pk})')
    for name, column, referred in fks:
        _sql(f'ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY ({column}) '
             f'REFERENCES {referred} (id)')
    for index, columns in indexes:
        _sql(f'CREATE INDEX {index} ON {table} ({columns})')


def upgrade() -> None:
    if not _postgres():
        return
    for table in TABLES:
        months = _months(table)
        _set_aside(table, 'plain')
        _sql(f'CREATE TABLE {table} (LIKE {table}_plain INCLUDING DEFAULTS INCLUDING '
             'CONSTRAINTS) PARTITION BY RANGE (hour)')
        for month in months:
            _sql(f'CREATE TABLE {table}_p{month.year:04d}_{month.month:02d} PARTITION OF {table} '
                 f'FOR VALUES FROM {_bound(month)} TO {_bound(_next_month(month))}')
        _sql(f'CREATE TABLE {table}_default PARTITION OF {table} DEFAULT')
        _sql(f'INSERT INTO {table} SELECT * FROM {table}_plain')
        _constrain(table)
        _sql(f'DROP TABLE {table}_plain')


def downgrade() -> None:
    if not _postgres():
        return
    for table in TABLES:
        _set_aside(table, 'partitioned')
        _sql(f'CREATE TABLE {table} (LIKE {table}_partitioned INCLUDING DEFAULTS INCLUDING '
             'CONSTRAINTS)')
        _sql(f'INSERT INTO {table} SELECT * FROM {table}_partitioned')
        _constrain(table)
        _sql(f'DROP TABLE {table}_partitioned')  # with its partitions
