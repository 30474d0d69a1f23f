"""Secrets never leave hostmeter: not in a log line, stdout, stderr, the dashboard or the
Prometheus output, whatever command runs and however it ends.

Every command an operator runs (ingest, run snapshot-usage, backfill, billing
close/rerun/finalize/show, runs, metrics aggregate with the Prometheus and the Mackerel export,
dashboard, demo) runs with a recognisable Mackerel API key in ``MACKEREL_API_KEY`` and a
database password in ``HOSTMETER_DATABASE_URL``; the password holds an ``@``, percent-encoded
in the URL as ``%40``. Then the commands that fail: the database down (a closed port), malformed
URLs that carry the password (an unencoded ``@``, a port that is not a number, another
database), and a wrong password. Every byte they wrote — stdout, stderr, every file under the
working directory and ``HOSTMETER_LOG_DIR`` (log lines, the Prometheus textfile, checkpoints),
the dashboard page — is searched for the key, the password in each of its spellings, and both
halves of the password around its ``@`` (what a half-redacted URL would leak).

PostgreSQL runs twice: on the shared test server, as a new role with a password and its own
database (dropped at the end), and on a private cluster that checks passwords (SCRAM) — see the
note on the shared server in :func:`shared_server`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from pgcluster import private_cluster

from metering.settings import Settings
from metering.timeutil import hours_between, month_bounds

pytestmark = pytest.mark.slow

TOKEN = uuid.uuid4().hex
API_KEY = f"hm-secret-key-{TOKEN[:16]}"
PASSWORD = f"pw-{TOKEN[16:24]}@{TOKEN[24:]}-tail"  # an "@" inside, "%40" in the URL
WRONG_PASSWORD = f"wrong-{uuid.uuid4().hex[:12]}@x"
PERIOD = "2026-10"
AFTER = "2026-11-01T03:00:00+09:00"
POSTGRES_URL = os.environ.get("HOSTMETER_TEST_POSTGRES_URL")


def secret_spellings(password: str) -> list[str]:
    """The password as given, percent-encoded (both ways), and each side of its ``@``."""
    spellings = {password, quote(password, safe=""), password.replace("@", "%40")}
    spellings |= {part for part in password.split("@") if len(part) >= 6}
    return sorted(spellings)


SECRETS = [API_KEY, *secret_spellings(PASSWORD), *secret_spellings(WRONG_PASSWORD)]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pg_url(user: str, password: str, host: str, port: int, database: str) -> str:
    return f"postgresql+psycopg://{user}:{quote(password, safe='')}@{host}:{port}/{database}"


@dataclass
class Session:
    """Runs ``hostmeter`` in one working directory and keeps everything it printed."""

    cwd: Path
    env: dict[str, str]
    printed: list[tuple[list[str], str]] = field(default_factory=list)

    def __call__(self, *args: str, url: str, code: int | None = 0) -> str:
        env = {**self.env, "HOSTMETER_DATABASE_URL": url}
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=self.cwd,
                              capture_output=True, text=True, timeout=600)
        self.printed.append((list(args), proc.stdout + proc.stderr))
        _no_secret_in(" ".join(args), proc.stdout + proc.stderr)  # first: a leak is the bug
        if code is not None:
            assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        return proc.stdout

    def assert_no_secret(self) -> None:
        """Nothing printed, and no file written under the working directory, holds a secret."""
        files = [p for p in self.cwd.rglob("*") if p.is_file()
                 and not p.name.startswith(("hostmeter.db", "usage"))]
        assert any(p.suffix == ".jsonl" for p in files)  # the log files are among them
        for path in files:
            _no_secret_in(str(path), path.read_text(errors="replace"))
        for args, text in self.printed:
            _no_secret_in(" ".join(args), text)


def _no_secret_in(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into {where}: {text[-2000:]}"


@pytest.fixture
def session(tmp_path: Path) -> Session:
    env = {**os.environ, "HOSTMETER_LOG_DIR": str(tmp_path / "logs"),
           "MACKEREL_API_KEY": API_KEY, "HOSTMETER_MACKEREL_SERVICE": "hostmeter-test"}
    env.pop("HOSTMETER_PROMETHEUS_TEXTFILE", None)
    return Session(cwd=tmp_path, env=env)


@pytest.fixture
def mackerel() -> Iterator[tuple[str, list[str]]]:
    """A Mackerel API stand-in that refuses every key (403), recording the keys it got."""
    keys: list[str] = []

    class Refuse(BaseHTTPRequestHandler):
        def _refuse(self) -> None:
            keys.append(self.headers.get("X-Api-Key", ""))
            body = json.dumps({"error": {"message": "Authentication failed"}}).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _refuse

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", keys
    server.shutdown()
    server.server_close()


# --- the databases -------------------------------------------------------------------------

Databases = Callable[[], str]
"""Makes a fresh, empty database and returns its URL (with the password)."""


@pytest.fixture
def shared_server() -> Iterator[Databases]:
    """A role with a password and databases it owns, on the shared test server.

    The shared server may trust connections from 127.0.0.1 (it did when this was written:
    ``host all all 127.0.0.1 trust``); then the password is not checked, but it still travels
    in the URL through every code path, and must not leak from any of them. The check below
    says which case holds; the private cluster (:func:`private_server`) always checks it.
    """
    if not POSTGRES_URL:
        pytest.skip("HOSTMETER_TEST_POSTGRES_URL is not set")
    admin_url = sa.engine.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    role = f"hm_secret_{uuid.uuid4().hex[:10]}"
    made: list[str] = []
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")

    def database() -> str:
        name = f"{role}_{len(made)}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name} OWNER {role}")
        made.append(name)
        return pg_url(role, PASSWORD, admin_url.host or "127.0.0.1", admin_url.port or 5432,
                      name)

    try:
        url = database()
        wrong = sa.create_engine(url.replace(quote(PASSWORD, safe=""), "not-the-password"))
        try:
            with wrong.connect():
                checked = False  # trusted: the password is sent but not verified
        except sa.exc.OperationalError:
            checked = True
        finally:
            wrong.dispose()
        print(f"shared server checks passwords: {checked}")
        yield database
    finally:
        with admin.connect() as conn:
            for name in made:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
        admin.dispose()


@pytest.fixture(scope="module")
def _cluster() -> Iterator[object]:
    with private_cluster() as cluster:
        yield cluster


@pytest.fixture
def private_server(_cluster: object) -> Databases:
    """A role with a password on a private cluster that verifies it (SCRAM over TCP)."""
    from pgcluster import PrivateCluster

    assert isinstance(_cluster, PrivateCluster)
    cluster = _cluster
    role = f"hm_secret_{uuid.uuid4().hex[:10]}"
    cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
    count = iter(range(100))

    def database() -> str:
        name = f"{role}_{next(count)}"
        cluster.psql(f"CREATE DATABASE {name} OWNER {role}")
        return cluster.url(role, PASSWORD, name)

    url = database()
    wrong = sa.create_engine(cluster.url(role, WRONG_PASSWORD, url.rsplit("/", 1)[1]))
    with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
        wrong.connect().close()  # the password is really checked here
    wrong.dispose()
    return database


@pytest.fixture(params=["sqlite", "postgresql-shared", "postgresql-private"])
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Databases:
    if request.param == "sqlite":  # no password: the API key still must not leak
        count = iter(range(100))
        return lambda: f"sqlite:///{tmp_path / f'hostmeter.db.{next(count)}'}"
    name = "shared_server" if request.param == "postgresql-shared" else "private_server"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


# --- the sessions --------------------------------------------------------------------------


def _usage(path: Path) -> None:
    start, _ = month_bounds(PERIOD, Settings().zone)
    with path.open("w") as f:
        for t in ("acme", "globex"):
            f.write(json.dumps({"type": "plan", "tenant": t, "plan": "standard",
                                "at": start.isoformat()}) + "\n")
            for h in hours_between(start, start + timedelta(hours=30)):
                f.write(json.dumps({"type": "host_post", "tenant": t, "host": f"{t}-1",
                                    "kind": "standard", "at": h.isoformat(),
                                    "metrics": ["loadavg5", "cpu.user"]}) + "\n")


def test_no_secret_leaks_from_any_command(session: Session, databases: Databases,
                                          mackerel: tuple[str, list[str]]) -> None:
    url = databases()
    usage = session.cwd / "usage.jsonl"
    _usage(usage)
    session("db", "upgrade", url=url)
    session("ingest", str(usage), url=url)
    session("run", "snapshot-usage", "--at", "2026-10-01T05:05:00Z", url=url)
    session("backfill", "snapshot-usage", "--from", "2026-09-30T15:00:00Z", "--to",
            "2026-10-01T03:00:00Z", url=url)
    session("billing", "close", "--period", PERIOD, "--at", AFTER, url=url)
    session("billing", "rerun", "--period", PERIOD, "--at", AFTER, "--dry-run", url=url)
    session("billing", "rerun", "--period", PERIOD, "--at", AFTER, "--reason", "check",
            url=url)
    session("billing", "finalize", "--period", PERIOD, url=url)
    for fmt in ("table", "csv"):
        session("billing", "show", "--period", PERIOD, "--format", fmt, url=url)
    session("runs", url=url)
    session("metrics", "aggregate", "--export", "prometheus", url=url)
    assert (session.cwd / "logs" / "hostmeter.prom").stat().st_size > 0
    base, keys = mackerel
    session.env["MACKEREL_API_BASE"] = base  # the key is sent, refused, and must not be shown
    session("metrics", "aggregate", "--export", "mackerel", url=url, code=1)
    assert keys and set(keys) == {API_KEY}
    session("dashboard", "--out", "dashboard.html", url=url)
    assert "<html" in (session.cwd / "dashboard.html").read_text().lower()
    session("demo", "--tenants", "12", "--period", PERIOD, url=databases())
    logs = list((session.cwd / "logs").glob("*.jsonl"))
    assert logs and sum(len(p.read_text().splitlines()) for p in logs) > 20
    session.assert_no_secret()


def _one_error(session: Session) -> str:
    _, text = session.printed[-1]
    errors = [ln for ln in text.splitlines() if ln.startswith("hostmeter: error:")]
    assert len(errors) == 1, text
    return errors[0]


def test_no_secret_leaks_when_commands_fail(session: Session, tmp_path: Path) -> None:
    usage = tmp_path / "usage.jsonl"
    _usage(usage)
    down = pg_url("app", PASSWORD, "127.0.0.1", closed_port(), "hostmeter")
    commands = [["ingest", str(usage)], ["run", "snapshot-usage", "--at", "2026-10-01T05:05:00Z"],
                ["billing", "close", "--period", PERIOD, "--at", AFTER],
                ["billing", "show", "--period", PERIOD], ["runs"], ["dashboard"],
                ["metrics", "aggregate", "--export", "prometheus"], ["db", "upgrade"]]
    for args in commands:
        session(*args, url=down, code=1)
        assert "cannot connect to postgresql+psycopg://app:***@127.0.0.1:" in _one_error(session)
    left, right = PASSWORD.split("@")
    for bad in (f"postgresql+psycopg://app:{PASSWORD}@127.0.0.1/hostmeter",  # "@" unencoded
                f"postgresql+psycopg://app:{left}%40{right}@127.0.0.1:port/hostmeter",
                f"postgres://app:{PASSWORD}@127.0.0.1:{closed_port()}/hostmeter",
                f"mysql://app:{quote(PASSWORD, safe='')}@127.0.0.1/hostmeter"):
        for args in commands[:3]:
            session(*args, url=bad, code=2)
            assert "HOSTMETER_DATABASE_URL" in _one_error(session)
    session.assert_no_secret()


def test_a_wrong_password_is_refused_without_showing_either(session: Session,
                                                            private_server: Databases) -> None:
    url = private_server()
    wrong = url.replace(quote(PASSWORD, safe=""), quote(WRONG_PASSWORD, safe=""))
    for args in (["runs"], ["run", "snapshot-usage", "--at", "2026-10-01T05:05:00Z"],
                 ["billing", "show", "--period", PERIOD]):
        session(*args, url=wrong, code=1)
        line = _one_error(session)
        assert "password authentication failed" in line and ":***@127.0.0.1:" in line
    session.assert_no_secret()
