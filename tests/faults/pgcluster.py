"""A private PostgreSQL cluster for fault tests: a test may stop it while a command runs.

``initdb`` + ``pg_ctl`` in a fresh temporary directory, listening on a spare loopback port,
with password authentication (SCRAM) over TCP, so that a password in a URL is really checked.
The superuser works over the cluster's own Unix socket without a password. When this process
runs as root (``initdb`` refuses root), the cluster runs as the ``postgres`` system user. The
shared server (127.0.0.1:5432) is never touched.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

__all__ = ["PrivateCluster", "private_cluster"]


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


def _spare_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PrivateCluster:
    """A running cluster: its port, socket directory, and how to stop and start it."""

    directory: Path
    port: int
    as_user: list[str]
    pg_ctl: str

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.data), *args], check=True,
                       capture_output=True, timeout=60)

    def start(self) -> None:
        self._pg_ctl("-o", f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
                     "-c fsync=off -c full_page_writes=off", "-l",
                     str(self.directory / "server.log"), "-w", "start")

    def stop(self, mode: str = "immediate") -> None:
        self._pg_ctl("-m", mode, "-w", "stop")

    def admin_url(self, database: str = "postgres") -> str:
        """The superuser over the Unix socket (no password)."""
        return (f"postgresql+psycopg://postgres@/{database}?host={self.directory}"
                f"&port={self.port}")

    def url(self, user: str, password: str, database: str) -> str:
        """``user`` over TCP on 127.0.0.1 with ``password`` (percent-encoded in the URL)."""
        return (f"postgresql+psycopg://{user}:{quote(password, safe='')}@127.0.0.1:{self.port}"
                f"/{database}")

    def psql(self, sql: str) -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(self.admin_url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(sql)
        finally:
            engine.dispose()

    def add_role(self, user: str, password: str, database: str) -> str:
        """A login role with ``password`` owning a new ``database``; returns its URL."""
        literal = password.replace("'", "''")
        self.psql(f"CREATE ROLE {user} LOGIN PASSWORD '{literal}'")
        self.psql(f"CREATE DATABASE {database} OWNER {user}")
        return self.url(user, password, database)


@contextmanager
def private_cluster() -> Iterator[PrivateCluster]:
    """Start a private cluster (skip the test when PostgreSQL's server binaries are missing)."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("needs PostgreSQL's initdb and pg_ctl")
    as_user: list[str] = []
    directory = Path(tempfile.mkdtemp(prefix="hm-pg-", dir="/tmp"))
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run a cluster as")
        os.chown(directory, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    pwfile = directory / "pwfile"
    pwfile.write_text("superuser-not-used-over-tcp\n")
    if as_user:
        os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
    subprocess.run([*as_user, initdb, "-D", str(directory / "data"), "-U", "postgres",
                    "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
                    "--no-sync"], check=True, capture_output=True, timeout=120)
    cluster = PrivateCluster(directory=directory, port=_spare_port(), as_user=as_user,
                             pg_ctl=pg_ctl)
    cluster.start()
    try:
        yield cluster
    finally:
        with suppress(subprocess.CalledProcessError):  # already stopped by the test
            cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
