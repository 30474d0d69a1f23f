"""Fixtures: every database test runs on SQLite and, when HOSTMETER_TEST_POSTGRES_URL is set,
on PostgreSQL too.

Isolation is a fresh database per test: SQLite copies a migrated template file; PostgreSQL
creates a database from a migrated template database (``CREATE DATABASE … TEMPLATE``). Both
are real, committed databases, so tests may use several connections or processes.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from redisservers import RedisCluster, RedisServer, redis_cluster, redis_server
from sqlalchemy.engine import Engine

from metering import db

POSTGRES_URL = os.environ.get("HOSTMETER_TEST_POSTGRES_URL")
BACKENDS = ["sqlite"] + (["postgresql"] if POSTGRES_URL else [])


def _pg_admin_url() -> sa.URL:
    assert POSTGRES_URL is not None
    url = sa.engine.make_url(POSTGRES_URL)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    engine = db.create_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    engine.dispose()  # closing the last connection checkpoints the WAL into the file
    assert not path.with_name(path.name + "-wal").exists()
    return path


@pytest.fixture(scope="session")
def _pg_template() -> Iterator[str]:
    admin = sa.create_engine(_pg_admin_url(), isolation_level="AUTOCOMMIT")
    name = f"hm_tmpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine = db.create_engine(_pg_admin_url().set(database=name).render_as_string(False))
    db.upgrade(engine)
    engine.dispose()
    yield name
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, migrated, empty database on ``backend``."""
    if backend == "sqlite":
        template = request.getfixturevalue("_sqlite_template")
        path = tmp_path / "hostmeter.db"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    template = request.getfixturevalue("_pg_template")
    name = f"hm_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(_pg_admin_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield _pg_admin_url().set(database=name).render_as_string(False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def empty_db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh database with no schema at all (for migration tests)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    name = f"hm_e_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(_pg_admin_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield _pg_admin_url().set(database=name).render_as_string(False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = db.create_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep tests from reading the developer's settings or writing logs into the checkout."""
    for var in ("HOSTMETER_DATABASE_URL", "HOSTMETER_BILLING_TZ", "HOSTMETER_LOG_DIR",
                "HOSTMETER_REDIS_URL", "HOSTMETER_REDIS_CLUSTER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOSTMETER_LOG_DIR", str(tmp_path / "logs"))


# --- real Redis servers (tests/redisservers.py) ------------------------------------------------


@pytest.fixture(scope="session")
def _redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_single(_redis_session: RedisServer) -> RedisServer:
    """A private ``redis-server`` (one per session), emptied for each test."""
    if _redis_session.process is None:  # a test stopped it
        _redis_session.start()
    _redis_session.cli("FLUSHALL")
    return _redis_session


@pytest.fixture(scope="session")
def _cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_3(_cluster_session: RedisCluster) -> RedisCluster:
    """A real 3-node Redis Cluster on loopback ports (one per session), emptied for each test."""
    _cluster_session.flushall()
    return _cluster_session


@pytest.fixture(params=["single", "cluster"])
def hot_path(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """``(url, cluster)`` of a real Redis: a single server, then a 3-node cluster."""
    if request.param == "single":
        return request.getfixturevalue("redis_single").url, False
    return request.getfixturevalue("redis_cluster_3").url, True
