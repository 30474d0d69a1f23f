"""Final invoices are sealed against every statement the application's own database user can send.

A final revision that carries an adjustment (and its lines) is attacked with direct SQL: each
statement must be refused by the database, and afterwards every invoice table holds exactly what
it held. On PostgreSQL, the two-role set-up (a migration owner and a runtime role from
``hostmeter db grant``) is run end to end: the jobs work as the runtime role, which cannot
disable, drop or bypass the triggers, nor truncate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billing import models as bm
from billing import repository as repo
from billing.service import BillingRequest, close_period, finalize_period, rerun_period
from metering import db
from metering import models as m
from metering.grants import check_runtime_role, grant_runtime_role
from metering.ingest import UsageRecorder
from metering.records import HostPost, PlanChange, Record
from metering.settings import Settings
from metering.timeutil import hours_between, month_bounds

ZONE = Settings().zone
PERIOD = "2026-02"
START, END = month_bounds(PERIOD, ZONE)
ROOT = Path(__file__).resolve().parents[2]


def _request(**kw: Any) -> BillingRequest:
    base: dict[str, Any] = dict(period=PERIOD, zone=ZONE, logical_time=END + timedelta(hours=3),
                                actor="ops@billing-1", run_id=uuid.uuid4().hex,
                                now=datetime(2026, 3, 1, tzinfo=UTC))
    base.update(kw)
    return BillingRequest(**base)


def _fleet(tenant: str, hosts: int) -> list[Record]:
    recs: list[Record] = [PlanChange(tenant=tenant, plan="standard", at=START)]
    for h in hours_between(START, END):
        recs += [HostPost(tenant=tenant, host=f"{tenant}-{i}", kind="standard",
                          at=h + timedelta(minutes=1), metrics=("cpu",)) for i in range(hosts)]
    return recs


def _dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {t.name: sorted(map(tuple, conn.execute(sa.select(t)).all()), key=repr)
                for t in (bm.invoices, bm.invoice_lines, bm.invoice_adjustments)}


def _seal(engine: Engine) -> dict[str, int]:
    """Tenant a: final revision 3 carrying an adjustment against final revision 2 (its lines
    too). Tenant b: a draft. Returns the ids the attacks aim at."""
    recorder = UsageRecorder(engine)
    recorder.record(_fleet("a", 1) + _fleet("b", 1))
    close_period(engine, _request())
    finalize_period(engine, _request(tenants=("a",)))
    recorder.record(_fleet("a", 2))
    rerun_period(engine, _request(reason="second host was missing", tenants=("a",)))
    finalize_period(engine, _request(tenants=("a",)))
    with engine.connect() as conn:
        stored = repo.load_invoices(conn, PERIOD)
    final = stored["a"][-1]
    draft = stored["b"][-1]
    assert (final.status, final.revision, len(final.adjustments)) == ("final", 2, 1)
    assert draft.status == "draft"
    return {"final": final.id, "adjustment": final.adjustments[0]["id"], "draft": draft.id,
            "tenant": _tenant_id(engine, "a")}


def _tenant_id(engine: Engine, key: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(m.tenants.c.id).where(m.tenants.c.key == key))
                   .scalar_one())


COMMON = [
    "UPDATE invoice_adjustments SET amount = 0 WHERE id = {adjustment}",
    "UPDATE invoice_adjustments SET reason = 'edited' WHERE invoice_id = {final}",
    "UPDATE invoice_adjustments SET invoice_id = {draft} WHERE id = {adjustment}",
    "DELETE FROM invoice_adjustments WHERE id = {adjustment}",
    "INSERT INTO invoice_adjustments (invoice_id, adjusts_invoice_id, standard_units, micro_units,"
    " tax, amount, reason, created_at, created_by) VALUES ({final}, {final}, 1, 0, 0, 1, 'x',"
    " '2026-03-01 00:00:00', 'x')",
    # moving a draft's line into the final invoice
    "UPDATE invoice_lines SET invoice_id = {final}, position = 99 WHERE invoice_id = {draft}",
    "UPDATE invoices SET total = 1 WHERE id = {final}",
    "DELETE FROM invoices WHERE id = {final}",
]
SQLITE_ONLY = [
    "INSERT OR REPLACE INTO invoices SELECT id, tenant_id, period, revision, 'draft', currency,"
    " catalog_version, standard_units, micro_units, subtotal, tax, 1, minor_units, content_hash,"
    " created_at, created_by, run_id, reason, NULL, voided_at FROM invoices WHERE id = {final}",
    "REPLACE INTO invoices SELECT * FROM invoices WHERE id = {final}",
    "INSERT OR REPLACE INTO invoice_adjustments SELECT id, {draft}, adjusts_invoice_id,"
    " standard_units, micro_units, tax, amount, reason, created_at, created_by"
    " FROM invoice_adjustments WHERE id = {adjustment}",
    "INSERT OR REPLACE INTO invoice_lines SELECT invoice_id, position, item, unit, units,"
    " unit_price, 0, basis FROM invoice_lines WHERE invoice_id = {final}",
    "INSERT INTO invoice_adjustments SELECT * FROM invoice_adjustments WHERE id = {adjustment}"
    " ON CONFLICT (id) DO UPDATE SET amount = 0",
]
POSTGRES_ONLY = [
    "TRUNCATE invoices CASCADE",
    "TRUNCATE invoice_lines",
    "TRUNCATE invoice_adjustments",
    "TRUNCATE tenants CASCADE",
    "TRUNCATE invoice_lines, invoice_adjustments, invoices",
    "INSERT INTO invoices SELECT * FROM invoices WHERE id = {final}"
    " ON CONFLICT (id) DO UPDATE SET total = 1",
]


def test_every_statement_against_a_final_invoice_is_refused(engine: Engine) -> None:
    ids = _seal(engine)
    before = _dump(engine)
    extra = SQLITE_ONLY if engine.dialect.name == "sqlite" else POSTGRES_ONLY
    accepted = []
    for template in COMMON + extra:
        statement = template.format(**ids)
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(statement)
        except sa.exc.DBAPIError:
            continue
        accepted.append(statement)
    assert accepted == []
    assert _dump(engine) == before


def test_drafts_stay_writable(engine: Engine) -> None:
    """The seal is about final and void invoices: a draft and its lines may still change."""
    ids = _seal(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE invoice_lines SET amount = amount WHERE invoice_id = "
                             f"{ids['draft']}")
        conn.exec_driver_sql(f"UPDATE invoices SET reason = 'note' WHERE id = {ids['draft']}")


# --- PostgreSQL: the migration owner and the runtime role -------------------------------------

POSTGRES_URL = os.environ.get("HOSTMETER_TEST_POSTGRES_URL")


@pytest.fixture
def two_roles() -> Iterator[tuple[str, str, str]]:
    """A database owned by a fresh owner role, and a fresh runtime role: (owner URL, runtime
    URL, runtime role)."""
    if not POSTGRES_URL:
        pytest.skip("PostgreSQL only: set HOSTMETER_TEST_POSTGRES_URL")
    admin_url = sa.engine.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
    suffix = uuid.uuid4().hex[:8]
    owner, runtime, name = f"hm_owner_{suffix}", f"hm_app_{suffix}", f"hm_roles_{suffix}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {owner} LOGIN")
        conn.exec_driver_sql(f"CREATE ROLE {runtime} LOGIN")
        conn.exec_driver_sql(f"CREATE DATABASE {name} OWNER {owner}")
    # PostgreSQL 15: only the database owner may create in its public schema
    with sa.create_engine(admin_url.set(database=name), isolation_level="AUTOCOMMIT").connect() \
            as conn:
        conn.exec_driver_sql(f"ALTER SCHEMA public OWNER TO {owner}")
    try:
        yield (admin_url.set(username=owner, database=name).render_as_string(False),
               admin_url.set(username=runtime, database=name).render_as_string(False), runtime)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {runtime}")
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {owner}")
        admin.dispose()


def _hostmeter(url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOSTMETER_DATABASE_URL": url, "HOSTMETER_LOG_DIR": str(cwd / "logs")}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600, check=False)


def test_the_runtime_role_runs_the_jobs_and_cannot_unseal_a_final_invoice(
    two_roles: tuple[str, str, str], tmp_path: Path
) -> None:
    owner_url, runtime_url, runtime = two_roles
    owner = db.create_engine(owner_url)
    db.upgrade(owner)
    statements = grant_runtime_role(owner, runtime)
    assert any("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES" in s for s in statements)

    # The whole pipeline as the runtime role: record, snapshot, close, finalize, rerun.
    app = db.create_engine(runtime_url)
    ids = _seal(app)
    done = _hostmeter(runtime_url, "run", "snapshot-usage", "--at", "2026-02-10T10:05:00Z",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert check_runtime_role(app).sealed
    assert not check_runtime_role(owner).sealed

    before = _dump(app)
    for statement in (
        "ALTER TABLE invoices DISABLE TRIGGER ALL",
        "ALTER TABLE invoices DISABLE TRIGGER trg_invoices_immutable",
        "DROP TRIGGER trg_invoices_immutable ON invoices",
        "DROP FUNCTION hostmeter_invoice_immutable() CASCADE",
        "TRUNCATE invoices CASCADE",
        "SET session_replication_role = replica",
        "DROP TABLE invoice_adjustments",
        "UPDATE alembic_version SET version_num = '0001'",
        f"UPDATE invoices SET total = 1 WHERE id = {ids['final']}",
    ):
        with pytest.raises(sa.exc.DBAPIError), app.begin() as conn:
            conn.exec_driver_sql(statement)
    assert _dump(app) == before
    app.dispose()
    owner.dispose()


def test_grant_refuses_a_superuser_an_unknown_role_and_the_owner(
    two_roles: tuple[str, str, str],
) -> None:
    from metering.errors import ConfigError

    owner_url, _runtime_url, _runtime = two_roles
    owner = db.create_engine(owner_url)
    db.upgrade(owner)
    owner_role = sa.engine.make_url(owner_url).username
    for role, message in (("postgres", "superuser"), ("hm_no_such_role", "does not exist"),
                          (owner_role, "owns the tables")):
        with pytest.raises(ConfigError, match=message):
            grant_runtime_role(owner, str(role))
    owner.dispose()


def test_grant_is_for_postgresql_only(tmp_path: Path) -> None:
    from metering.errors import ConfigError

    engine = db.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ConfigError, match="PostgreSQL"):
        grant_runtime_role(engine, "anyone")


def test_db_grant_and_db_current_from_the_command_line(
    two_roles: tuple[str, str, str], tmp_path: Path
) -> None:
    owner_url, runtime_url, runtime = two_roles
    assert _hostmeter(owner_url, "db", "upgrade", cwd=tmp_path).returncode == 0
    granted = _hostmeter(owner_url, "db", "grant", runtime, cwd=tmp_path)
    assert granted.returncode == 0, granted.stderr
    assert f"to {runtime}" in granted.stdout
    as_owner = _hostmeter(owner_url, "db", "current", cwd=tmp_path)
    assert "the owner of the tables: it could unseal final invoices" in as_owner.stdout
    as_runtime = _hostmeter(runtime_url, "db", "current", cwd=tmp_path)
    assert f"role: {runtime} (runtime role" in as_runtime.stdout, as_runtime.stdout
    refused = _hostmeter(owner_url, "db", "grant", "postgres", cwd=tmp_path)
    assert refused.returncode == 2 and "superuser" in refused.stderr
