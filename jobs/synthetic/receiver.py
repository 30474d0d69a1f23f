"""A webhook receiver on 127.0.0.1 for the demo and the tests: a real HTTP server (stdlib,
threaded) that checks every POST's signature with :func:`billing.outbox.verify` and records
what it got.

What it answers is scriptable, one behaviour per request in order, then ``default`` (200,
changed by :meth:`Receiver.answer_by_default`)::

    with Receiver(secret) as r:             # started on a free port
        r.script(Respond(500), Respond(429, retry_after="120"), Hang(5.0), Respond(200))
        ...                                 # POST to r.url
        r.received                          # every request, answered or not
        r.delivered_ids()                   # event ids answered 2xx with a valid signature

:class:`Hang` holds the request without answering for ``seconds`` (longer than the sender's
timeout: the sender gives up), then closes the connection. A request with a bad signature is
answered 400 and recorded as such, whatever the script says; the script's behaviour is not
used up by it. The receiver's clock (``clock``, unix seconds) is what the signature's
timestamp is checked against; tests that drive time pass theirs.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from billing import outbox

__all__ = ["Hang", "Received", "Receiver", "Respond"]


@dataclass(frozen=True, slots=True, kw_only=False)
class Respond:
    """Answer with ``status`` (and a ``Retry-After`` header when given)."""

    status: int = 200
    retry_after: str | None = None
    body: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=False)
class Hang:
    """Answer nothing for ``seconds``, then close the connection."""

    seconds: float


Behaviour = Respond | Hang


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    """One request as the receiver saw it."""

    path: str
    event_id: str | None
    event_type: str | None
    idempotency_key: str | None
    timestamp: str | None
    signature_valid: bool
    body: bytes = field(repr=False)
    payload: dict[str, Any] | None = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    answered: int | None
    """The status answered; ``None`` when the request was held (:class:`Hang`)."""

    @property
    def accepted(self) -> bool:
        return self.answered is not None and 200 <= self.answered < 300


class Receiver:
    """A threaded HTTP server on ``host`` (a free port unless ``port``), POSTs to any path."""

    def __init__(self, secret: str, *, host: str = "127.0.0.1", port: int = 0,
                 path: str = "/hooks", default: Behaviour = Respond(200),
                 clock: Callable[[], float] = time.time, tolerance: int = 300) -> None:
        self._secret = secret
        self._default = default
        self._clock = clock
        self._tolerance = tolerance
        self._path = path
        self._script: deque[Behaviour] = deque()
        self._received: list[Received] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # --- life cycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{name}]" if ":" in name else name
        return f"http://{shown}:{port}{self._path}"

    def start(self) -> Receiver:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.05},
                                            name="webhook-receiver", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases held requests
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- script and record -------------------------------------------------------------------

    def script(self, *behaviours: Behaviour) -> None:
        """Answer the next requests with ``behaviours``, in order (after any still queued)."""
        with self._lock:
            self._script.extend(behaviours)

    def answer_by_default(self, behaviour: Behaviour) -> None:
        """Answer with ``behaviour`` once the script is used up (200 unless told)."""
        with self._lock:
            self._default = behaviour

    @property
    def scripted_left(self) -> int:
        with self._lock:
            return len(self._script)

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def delivered_ids(self) -> list[str]:
        """Event ids answered 2xx with a valid signature, in arrival order (duplicates kept)."""
        return [r.event_id for r in self.received
                if r.accepted and r.signature_valid and r.event_id is not None]

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until ``count`` requests have been received (for callers in other threads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.received) >= count:
                return True
            time.sleep(0.01)
        return len(self.received) >= count

    # --- the server side ---------------------------------------------------------------------

    def _next(self) -> Behaviour:
        with self._lock:
            return self._script.popleft() if self._script else self._default

    def _record(self, received: Received) -> None:
        with self._lock:
            self._received.append(received)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length > 0 else b""
        headers = {k: v for k, v in handler.headers.items()}
        valid = outbox.verify(self._secret, handler.headers.get(outbox.SIGNATURE_HEADER, ""),
                              body, now=int(self._clock()), tolerance=self._tolerance)
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None

        def record(answered: int | None) -> None:
            self._record(Received(
                path=handler.path, event_id=handler.headers.get("Hostmeter-Event-Id"),
                event_type=handler.headers.get("Hostmeter-Event-Type"),
                idempotency_key=handler.headers.get("Idempotency-Key"),
                timestamp=handler.headers.get("Hostmeter-Timestamp"), signature_valid=valid,
                body=body, payload=payload if isinstance(payload, dict) else None,
                headers=headers, answered=answered))

        if not valid:
            record(400)
            _answer(handler, Respond(400, body=b"bad signature"))
            return
        behaviour = self._next()
        if isinstance(behaviour, Hang):
            record(None)
            self._stopping.wait(behaviour.seconds)
            handler.close_connection = True
            return
        record(behaviour.status)
        _answer(handler, behaviour)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "hostmeter-receiver"

            def do_POST(self) -> None:
                try:
                    receiver._handle(self)
                except (BrokenPipeError, ConnectionResetError):  # the sender gave up
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

        return Handler


def _answer(handler: BaseHTTPRequestHandler, behaviour: Respond) -> None:
    extra: Mapping[str, str] = ({"Retry-After": behaviour.retry_after}
                                if behaviour.retry_after is not None else {})
    handler.send_response(behaviour.status)
    for name, value in extra.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(behaviour.body)))
    handler.end_headers()
    if behaviour.body:
        handler.wfile.write(behaviour.body)
