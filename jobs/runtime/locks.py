"""Cross-process locks on a run key, released by the operating system when a process dies.

- PostgreSQL: a session-level advisory lock on a dedicated connection. If the process is killed
  (even with SIGKILL) its connection closes and the server releases the lock.
- SQLite: ``flock(2)`` on a small file next to the database (``<db>.locks/<key>.lock``); the
  kernel releases it when the process dies. An in-memory database uses a process-local lock.

Because a lock never outlives its holder, a ``running`` ledger row whose key can be locked
belongs to a dead process: the next trigger marks it abandoned and retries.

Known limit (PostgreSQL): the lock lives as long as its connection. If that connection is cut
while the job still runs (a proxy's idle timeout, a server restart), the lock is gone and a
second trigger could start the same key. TCP keepalives (set in ``metering.db``) keep an idle
lock connection from being dropped by middleboxes; a connection pooler in transaction mode
(PgBouncer) cannot carry session locks at all, so connect hostmeter to PostgreSQL directly or
through session pooling.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

__all__ = ["DEFAULT_WAIT_S", "key_lock"]

DEFAULT_WAIT_S = 900.0
"""How long a trigger waits for the lock of a key that another run holds, unless told otherwise
(``hostmeter run --wait``; the Lambda handler has its own, shorter default)."""

_POLL_S = 0.2
_LOCAL: dict[str, threading.Lock] = {}
_LOCAL_GUARD = threading.Lock()


def _pg_keys(key: str) -> tuple[int, int]:
    digest = hashlib.sha256(key.encode()).digest()
    a = int.from_bytes(digest[:4], "big", signed=True)
    b = int.from_bytes(digest[4:8], "big", signed=True)
    return a, b


@contextmanager
def _pg_lock(engine: Engine, key: str, wait_s: float) -> Iterator[bool]:
    a, b = _pg_keys(key)
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        deadline = time.monotonic() + wait_s
        while True:
            got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:a, :b)"),
                               {"a": a, "b": b}).scalar_one()
            if got or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        try:
            yield bool(got)
        finally:
            if got:
                try:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:a, :b)"),
                                 {"a": a, "b": b})
                except sa.exc.DBAPIError:
                    # The session is gone, and the server dropped its locks with it.
                    import structlog

                    structlog.get_logger("hostmeter.locks").warning(
                        "lock_connection_lost", key=key)
    finally:
        conn.close()


def _sqlite_path(engine: Engine) -> str | None:
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return None
    return str(Path(database).expanduser().resolve())


@contextmanager
def _file_lock(path: Path, wait_s: float) -> Iterator[bool]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        got = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
            except BlockingIOError:
                got = False
            if got or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        try:
            yield got
        finally:
            if got:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def _local_lock(key: str, wait_s: float) -> Iterator[bool]:
    with _LOCAL_GUARD:
        lock = _LOCAL.setdefault(key, threading.Lock())
    got = lock.acquire(timeout=wait_s) if wait_s > 0 else lock.acquire(blocking=False)
    try:
        yield got
    finally:
        if got:
            lock.release()


@contextmanager
def key_lock(engine: Engine, key: str, *, wait_s: float = 0.0) -> Iterator[bool]:
    """Hold the lock on ``key`` for the ``with`` block; yields whether it was acquired
    (waiting up to ``wait_s`` seconds for another holder to finish)."""
    cm: Any
    if engine.dialect.name == "postgresql":
        cm = _pg_lock(engine, key, wait_s)
    else:
        db_path = _sqlite_path(engine)
        if db_path is None:
            cm = _local_lock(key, wait_s)
        else:
            name = hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock"
            cm = _file_lock(Path(db_path + ".locks") / name, wait_s)
    with cm as got:
        yield got
