"""Alembic environment: one metadata for every package's tables, one code path per backend.

A caller that already holds a connection (``hostmeter db upgrade``, the tests) passes it in
``config.attributes["connection"]``; otherwise the URL comes from ``sqlalchemy.url`` or
``HOSTMETER_DATABASE_URL``.
"""

from __future__ import annotations

import os

from alembic import context

import billing.models
import billing.notices  # noqa: F401  (estimates, budget alerts, the webhook outbox)
import jobs.monitoring.store
import jobs.runtime.ledger  # noqa: F401  (registers the run ledger on the metadata)
import metering.models  # noqa: F401  (registers the usage tables on the metadata)
from metering.db import create_engine, metadata
from metering.partitions import include_name

config = context.config
target_metadata = metadata


def _render_item(type_: str, obj: object, autogen_context: object) -> str | bool:
    # Revisions spell our UTC column type as the plain type it is stored as, so that a shipped
    # revision never depends on application code.
    from metering.db import UTCDateTime

    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite can only ALTER through table copies
        compare_type=True,
        render_item=_render_item,
        include_name=include_name,  # monthly partitions are not tables of the models
    )


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get(
        "HOSTMETER_DATABASE_URL", "sqlite:///hostmeter.db"
    )
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.get_main_option("sqlalchemy.url") or os.environ.get(
        "HOSTMETER_DATABASE_URL", "sqlite:///hostmeter.db"
    )
    engine = create_engine(url)
    with engine.connect() as conn:
        _configure(conn)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
