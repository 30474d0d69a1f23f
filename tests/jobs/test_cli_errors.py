"""One-line errors of the command line: bad database URLs, an unreachable database, names.

Every case runs the real ``hostmeter`` in a subprocess and reads its stderr as an operator
would: exactly one ``hostmeter: error:`` line, no traceback, nothing secret, the exit code of
DESIGN.md (1: the database is unreachable or the work failed; 2: a malformed setting or input).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SECRET = "pw-Very-Secret-9"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def hostmeter(tmp_path: Path, *args: str, url: str | None = None,
              via_option: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOSTMETER_LOG_DIR": str(tmp_path / "logs")}
    env.pop("HOSTMETER_DATABASE_URL", None)
    argv = [sys.executable, "-m", "jobs.cli"]
    if url is not None and via_option:
        argv += ["--database-url", url]
    elif url is not None:
        env["HOSTMETER_DATABASE_URL"] = url
    return subprocess.run([*argv, *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


def the_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The one error line; every other stderr line must be a JSON log line."""
    others = [ln for ln in proc.stderr.splitlines() if not ln.startswith("{")]
    assert len(others) == 1, proc.stderr
    [line] = others
    assert line.startswith("hostmeter: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return line


URL_HINT = "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"


@pytest.mark.parametrize(("url", "says"), [
    (f"mysql://app:{SECRET}@127.0.0.1/db", "database 'mysql' is not supported"),
    (f"postgresql+nodriver://app:{SECRET}@127.0.0.1/db", "driver 'nodriver' is not supported"),
    (f"postgresql+psycopg://app:{SECRET}@127.0.0.1:abc/db", "the port is not a number"),
    (f"postgresql+psycopg://app:{SECRET[:6]}@{SECRET[6:]}@127.0.0.1/db",
     "must be percent-encoded as %40"),
    ("not a url", "not a database URL"),
])
@pytest.mark.parametrize("via_option", [False, True], ids=["env", "option"])
def test_a_malformed_database_url_is_one_line_and_exit_2(tmp_path: Path, url: str, says: str,
                                                        via_option: bool) -> None:
    proc = hostmeter(tmp_path, "runs", url=url, via_option=via_option)
    assert proc.returncode == 2, proc.stderr
    line = the_error(proc)
    assert says in line and URL_HINT in line
    for part in (SECRET, SECRET[:6], SECRET[6:]):
        assert part not in proc.stderr + proc.stdout


@pytest.mark.parametrize("scheme", ["postgresql+psycopg", "postgres"])
def test_an_unreachable_database_is_one_line_and_exit_1(tmp_path: Path, scheme: str) -> None:
    # postgres:// is accepted as postgresql+psycopg:// (libpq's and many providers' spelling),
    # so it reaches the connection attempt like the canonical form
    url = f"{scheme}://app:{SECRET}@127.0.0.1:{closed_port()}/db"
    for args in (["runs"], ["run", "snapshot-usage", "--at", "2026-10-01T05:05:00Z"],
                 ["billing", "show", "--period", "2026-10"], ["db", "upgrade"]):
        proc = hostmeter(tmp_path, *args, url=url)
        assert proc.returncode == 1, (args, proc.stderr)
        line = the_error(proc)
        assert "cannot connect to postgresql+psycopg://app:***@127.0.0.1:" in line
        assert "Connection refused" in line and "check that the database is up" in line
        assert SECRET not in proc.stderr + proc.stdout
        logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*"))
        assert SECRET not in logs


def test_error_lines_escape_control_characters_and_cut_long_names(db_url: str,
                                                                  tmp_path: Path) -> None:
    hostile = "\x1b]0;owned\x07\x1b[2JAcme "
    proc = hostmeter(tmp_path, "billing", "show", "--period", "2026-10", "--tenant", hostile,
                     url=db_url)
    assert proc.returncode == 2
    line = the_error(proc)
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr
    assert "unknown tenant(s): '\\x1b]0;owned\\x07\\x1b[2JAcme '" in line  # quoted: space shows

    huge = "A" * 10240
    proc = hostmeter(tmp_path, "billing", "show", "--period", "2026-10", "--tenant", huge,
                     url=db_url)
    line = the_error(proc)
    assert "…(10240 chars)" in line and len(line) < 300


def test_other_echoed_names_are_quoted_and_cut(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    for args, shown in (
        (["backfill", "snapshot-usage", "--from", "2026-10-01T00:00:00Z", "--to",
          "2026-09-01T00:00:00Z"], "--to '2026-09-01T00:00:00Z' must be after"),
        (["metrics", "aggregate", "--logs", "no\x1b[31msuch "], "--logs 'no\\x1b[31msuch '"),
    ):
        proc = hostmeter(tmp_path, *args, url=url)
        assert proc.returncode == 2, proc.stderr
        assert shown in the_error(proc)
        assert "\x1b" not in proc.stderr
