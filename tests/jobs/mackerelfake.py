"""A Mackerel stand-in on 127.0.0.1: service-metric tsdb and graph definitions, with faults.

It serves ``POST /api/v0/services/<service>/tsdb`` and ``POST /api/v0/graph-defs/create`` and
keeps what Mackerel's tsdb keeps: the last value posted for each (name, time). Each request takes
the next :class:`Fault` from a script (then answers normally):

- ``Fault.status(429, retry_after="120")`` or ``Fault.status(503)``: refuse, store nothing;
- ``Fault.late()``: store the points, then answer only after ``late_s`` (past the client's
  timeout): the write happened, the client never hears of it;
- ``Fault.hang(lands=True)``: hold the request unanswered until :meth:`MackerelStandIn.release`
  (or shutdown); when released, a request that ``lands`` stores its points *then*, possibly
  after newer values were posted: the stale late write a timed-out request can make.

Tests compare :meth:`MackerelStandIn.state` (name → {epoch seconds: value}) with
:func:`store_state`, the store's points in Mackerel's window, under their Mackerel names.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy.engine import Engine

from jobs.monitoring.logmetrics import read_points
from jobs.monitoring.mackerel import MAX_AGE, mackerel_name

__all__ = ["Fault", "MackerelStandIn", "Request", "store_state"]


def store_state(engine: Engine, now: datetime) -> dict[str, dict[int, float]]:
    """The store's points Mackerel still accepts at ``now``: name → {time: value}."""
    out: dict[str, dict[int, float]] = {}
    for p in read_points(engine):
        if p.time >= now - MAX_AGE:
            out.setdefault(mackerel_name(p), {})[int(p.time.timestamp())] = float(p.value)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """How the stand-in answers one request."""

    kind: str  # "ok" | "status" | "late" | "hang"
    status: int = 200
    retry_after: str | None = None
    lands: bool = False

    @classmethod
    def ok(cls) -> Fault:
        return cls(kind="ok")

    @classmethod
    def refuse(cls, status: int, retry_after: str | None = None) -> Fault:
        return cls(kind="status", status=status, retry_after=retry_after)

    @classmethod
    def late(cls) -> Fault:
        return cls(kind="late")

    @classmethod
    def hang(cls, *, lands: bool = False) -> Fault:
        return cls(kind="hang", lands=lands)


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One request the stand-in received, and how it was answered."""

    path: str
    api_key: str | None
    fault: Fault
    points: int


@dataclass
class _Held:
    body: list[dict[str, Any]]
    lands: bool
    done: threading.Event = field(default_factory=threading.Event)


class MackerelStandIn:
    """A threaded HTTP stand-in of Mackerel's service-metric API (see the module docstring)."""

    def __init__(self, api_key: str, *, service: str = "hostmeter", late_s: float = 1.0,
                 max_hold_s: float = 30.0) -> None:
        self.api_key = api_key
        self.service = service
        self.late_s = late_s
        self.max_hold_s = max_hold_s
        self.requests: list[Request] = []
        self.graph_defs: list[list[dict[str, Any]]] = []
        self._held_values: dict[str, dict[int, float]] = {}
        self._stored: list[dict[str, Any]] = []
        self._scripts: dict[str, deque[Fault]] = {"tsdb": deque(), "graph-defs": deque()}
        self._always: dict[str, Fault | None] = {"tsdb": None, "graph-defs": None}
        self._hung: list[_Held] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def then(self, *faults: Fault, endpoint: str = "tsdb") -> None:
        """Answer the next requests to ``endpoint`` (``tsdb`` or ``graph-defs``) with
        ``faults``, in order; after them, answer normally."""
        with self._lock:
            self._scripts[endpoint].extend(faults)

    def always(self, fault: Fault | None, *, endpoint: str = "tsdb") -> None:
        """Answer every request to ``endpoint`` with ``fault`` once its script is used up
        (None: normally)."""
        with self._lock:
            self._always[endpoint] = fault

    def scripted(self, endpoint: str = "tsdb") -> int:
        """How many scripted faults are still waiting for a request to ``endpoint``."""
        with self._lock:
            return len(self._scripts[endpoint])

    def release(self) -> int:
        """Let every hung request finish (those that ``land`` store their points now)."""
        with self._lock:
            hung, self._hung = self._hung, []
        for held in hung:
            if held.lands:
                self._store(held.body)
            held.done.set()
        return len(hung)

    def state(self) -> dict[str, dict[int, float]]:
        """What the tsdb holds: name → {time: value}."""
        with self._lock:
            return {name: dict(times) for name, times in self._held_values.items()}

    def stored(self) -> list[dict[str, Any]]:
        """Every point the tsdb stored, in the order it stored them (repeats included)."""
        with self._lock:
            return list(self._stored)

    def tsdb_requests(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/tsdb")]

    def close(self) -> None:
        for held in self._hung:  # nothing lands at shutdown
            held.done.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MackerelStandIn:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- serving -------------------------------------------------------------------------

    def _store(self, body: list[dict[str, Any]]) -> None:
        with self._lock:
            self._stored.extend(body)
            for p in body:
                self._held_values.setdefault(p["name"], {})[int(p["time"])] = float(p["value"])

    def _next_fault(self, path: str, key: str | None, body: Any) -> Fault:
        endpoint = "tsdb" if path.endswith("/tsdb") else "graph-defs"
        script = self._scripts[endpoint]
        with self._lock:
            fault = script.popleft() if script else (self._always[endpoint] or Fault.ok())
            points = len(body) if isinstance(body, list) else 0
            self.requests.append(Request(path=path, api_key=key, fault=fault, points=points))
            return fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self
        tsdb = f"/api/v0/services/{self.service}/tsdb"

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                key = self.headers.get("X-Api-Key")
                if self.path not in (tsdb, "/api/v0/graph-defs/create"):
                    self._answer(404, {"error": {"message": "not found"}})
                    return
                fault = stand_in._next_fault(self.path, key, body)
                if key != stand_in.api_key:
                    self._answer(403, {"error": {"message": "invalid api key"}})
                    return
                if fault.kind == "status":
                    headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                    self._answer(fault.status, {"error": {"message": "try later"}}, headers)
                    return
                if fault.kind == "hang":
                    held = _Held(body=body if self.path == tsdb else [], lands=fault.lands)
                    with stand_in._lock:
                        stand_in._hung.append(held)
                    held.done.wait(stand_in.max_hold_s)
                    self._answer(200, {"success": True})
                    return
                if self.path == tsdb:
                    stand_in._store(body)
                else:
                    with stand_in._lock:
                        stand_in.graph_defs.append(body)
                if fault.kind == "late":
                    time.sleep(stand_in.late_s)
                self._answer(200, {"success": True})

            def _answer(self, status: int, payload: dict[str, Any],
                        headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up waiting
                    self.close_connection = True

            def log_message(self, *_args: object) -> None:  # keep test output quiet
                pass

        return Handler
