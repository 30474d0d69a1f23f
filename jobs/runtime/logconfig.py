"""structlog, configured once: JSON lines to a file under HOSTMETER_LOG_DIR and to stderr.

stderr gets JSON lines too, or a console rendering when it is a terminal. A redaction processor
runs before any renderer, so secrets never reach a sink: values of secret-looking keys
(``api_key``, ``password``, ``X-Api-Key``…), passwords inside URLs (also one holding an
unencoded ``@``: everything up to the last ``@`` of the URL), and wherever they appear, the
literal values of the process's secrets (``MACKEREL_API_KEY``, the password of
``HOSTMETER_DATABASE_URL`` in every spelling, and any passed to :func:`configure_logging`).

Names in events are shown safely: a JSON line escapes every control character (C1 controls and
bidirectional overrides too, which ``json`` would leave raw), and the console rendering of a
terminal escapes them visibly and leaves the traceback to the log file (the terminal gets the
command's one-line error).

Per-item events (a line per tenant-hour, invoice or tenant of an input: tens of thousands in a
run) go through :func:`item_events`, the fast path of the same configuration. Logged one by
one, a ``tenant_hour`` line cost about 40 µs (most of it the URL regex of the redaction, run on
every text value, and two flushes); in bulk it costs about a quarter of that: the processors
run once per block on the fields every line shares, each line's own fields are redacted and
rendered as above, and lines are written and flushed :data:`ITEM_LINES_PER_WRITE` at a time.
An event written either way is the same line, byte for byte but for its timestamp.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from metering.db import password_forms
from metering.display import escape_controls, one_line

__all__ = ["ITEM_LINES_PER_WRITE", "SecretRedactor", "configure_logging", "item_events",
           "redact_secrets", "register_secrets"]

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_SECRET_KEYS = re.compile(r"(api[_-]?key|password|passwd|secret|token|authorization)", re.I)
# The password runs to the last "@" of the URL (greedy, within one whitespace- and quote-free
# token): a password with an unencoded "@" is hidden whole, not up to its first "@".
_URL_PASSWORD = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s'\"]*):(?P<pw>[^\s'\"]+)@", re.I
)
_SECRET_ENV = ("MACKEREL_API_KEY",)
_SECRET_URL_ENV = ("HOSTMETER_DATABASE_URL", "HOSTMETER_REDIS_URL")
_MIN_SECRET = 4  # shorter values are no secret worth garbling every line for
_PLAIN = (int, float, bool, type(None))  # values with no text to hide


@functools.lru_cache(maxsize=1024)
def _secret_key(key: str) -> bool:
    """``key`` names a secret (field names are few and repeat on every line: asked once each)."""
    return _SECRET_KEYS.search(key) is not None


def _environment_secrets() -> list[str]:
    found = [os.environ.get(name, "") for name in _SECRET_ENV]
    for name in _SECRET_URL_ENV:
        found += password_forms(os.environ.get(name) or None)
    return found


class SecretRedactor:
    """A processor that replaces secrets with ``***``: the values of secret-looking keys,
    passwords inside URLs, and the given literal ``secrets`` wherever they occur."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Also hide ``secrets`` from now on (values shorter than 4 characters are ignored)."""
        found = set(self.secrets) | {s for s in secrets if s and len(s) >= _MIN_SECRET}
        self.secrets = sorted(found, key=len, reverse=True)  # longest first: no half-replaced

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, _PLAIN):
            return value
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, "***")
            # The pattern needs a "://": text without one (nearly every value) skips the regex.
            if "://" not in value:
                return value
            return _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", value)
        if isinstance(value, dict):
            return {k: "***" if _secret_key(str(k)) else self._scrub(v)
                    for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._scrub(v) for v in value)
        return value

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        scrub = self._scrub
        return {
            k: "***" if v is not None and _secret_key(k) else scrub(v)
            for k, v in event_dict.items()
        }


redact_secrets = SecretRedactor()
"""Redaction by key and inside URLs only (no literal secrets)."""

# json.dumps(ensure_ascii=False) escapes C0 controls but leaves C1 controls (U+0080–U+009F,
# CSI among them), the bidirectional overrides and the line separators raw.
_JSON_UNSAFE = {c: f"\\u{c:04x}" for c in [*range(0x7F, 0xA0), 0x061C, 0x200E, 0x200F,
                                            *range(0x2028, 0x202F), *range(0x2066, 0x206A)]}


def _json_safe(line: str) -> str:
    """``line`` with the characters of :data:`_JSON_UNSAFE` escaped (ASCII text without DEL,
    nearly every line, has none of them: ``str.translate`` is skipped)."""
    if line.isascii() and "\x7f" not in line:
        return line
    return line.translate(_JSON_UNSAFE)


def _console_safe(value: Any) -> Any:
    if isinstance(value, str):
        return escape_controls(value)
    if isinstance(value, dict):
        return {k: _console_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_console_safe(v) for v in value]
    return value


class _TeeLogger:
    """Writes each event as a JSON line to a file and renders it to stderr."""

    def __init__(self, file: TextIO | None, stream: TextIO, console: bool, min_level: int) -> None:
        self.file = file
        self.stream = stream
        self.console = structlog.dev.ConsoleRenderer(colors=False) if console else None
        self.min_level = min_level

    def _emit(self, event_dict: EventDict) -> None:
        line = _json_safe(json.dumps(event_dict, default=str, ensure_ascii=False))
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
        if _LEVELS.get(str(event_dict.get("level")), 20) >= self.min_level:
            if self.console:
                shown = {k: _console_safe(v) for k, v in event_dict.items() if k != "exception"}
                text = str(self.console(None, "", shown))
            else:
                text = line
            self.stream.write(text + "\n")
            self.stream.flush()

    def msg(self, **event_dict: Any) -> None:
        self._emit(event_dict)

    def write_lines(self, lines: list[str], level: str) -> None:
        """Write JSON lines already rendered (by :func:`item_events`) in one go, flushed once.
        The stream gets them at ``level`` or above; a console rendering never comes here."""
        if not lines:
            return
        text = "\n".join(lines) + "\n"
        if self.file is not None:
            self.file.write(text)
            self.file.flush()
        if _LEVELS.get(level, 20) >= self.min_level:
            self.stream.write(text)
            self.stream.flush()

    debug = info = warning = warn = error = critical = exception = log = msg


class _LibraryRecords(logging.Handler):
    """Records of libraries' standard logging (psycopg, SQLAlchemy, Alembic) as events of ours.

    Without it Python prints a library's warning raw on stderr (psycopg's "error ignored
    terminating Pipeline" when the server goes away): a second, unredacted line beside the
    command's one-line error. Here it becomes a ``library_log`` event, redacted like every
    event, at ``info`` (or ``error``), so a terminal shows it only when it is an error.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string must not break logging
            message = str(record.msg)
        level = "error" if record.levelno >= logging.ERROR else "info"
        getattr(structlog.get_logger("hostmeter.library"), level)(
            "library_log", logger=record.name, message=one_line(message))


_state: dict[str, Any] = {}
_STAMPER = structlog.processors.TimeStamper(fmt="iso", utc=True)


def register_secrets(secrets: Iterable[str]) -> None:
    """Hide ``secrets`` from every later log line of this process: for secrets learned after
    :func:`configure_logging` (a URL or key fetched from Secrets Manager or SSM). Pass the
    forms a value may take, e.g. :func:`metering.db.password_forms` of a database URL."""
    redactor = _state.get("redactor")
    if redactor is not None:
        redactor.add(secrets)


def configure_logging(
    log_dir: str | None = None,
    *,
    stream: TextIO | None = None,
    stderr_level: str = "info",
    file_name: str = "hostmeter.jsonl",
    secrets: Iterable[str] = (),
) -> Path | None:
    """Configure structlog for this process (again, if called again). Returns the log file.

    ``secrets`` are literal values never to be written (beside those read from the
    environment: ``MACKEREL_API_KEY`` and the password of ``HOSTMETER_DATABASE_URL``).
    """
    redactor = SecretRedactor([*_environment_secrets(), *secrets])
    old = _state.get("file")
    if old is not None:
        old.close()
    path: Path | None = None
    file: TextIO | None = None
    if log_dir:
        try:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            path = Path(log_dir) / file_name
            file = path.open("a", encoding="utf-8")
        except OSError as exc:
            print(f"hostmeter: warning: cannot write logs to {log_dir}: {exc}", file=sys.stderr)
            path, file = None, None
    _state["file"] = file
    _state["redactor"] = redactor
    out = stream or sys.stderr
    console = out.isatty() and os.environ.get("HOSTMETER_LOG_FORMAT") != "json"
    sink = _TeeLogger(file, out, console, _LEVELS.get(stderr_level, 20))
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _STAMPER,
        structlog.processors.format_exc_info,
        redactor,
    ]

    def factory(*_: Any) -> _TeeLogger:
        return sink

    _state["sink"] = sink
    _state["processors"] = tuple(processors)
    _state["factory"] = factory
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(10),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _LibraryRecords)]:
        root.removeHandler(handler)
    root.addHandler(_LibraryRecords(logging.WARNING))
    return path


ITEM_LINES_PER_WRITE = 1000
"""Lines :func:`item_events` renders before it writes them (and flushes) in one go."""

_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)  # json.dumps(…) of every line


def _fast_sink(level: str) -> tuple[_TeeLogger, SecretRedactor, tuple[Any, ...]] | None:
    """The sink, redactor and processors of :func:`configure_logging`'s configuration if it is
    the one in force (not replaced, e.g. by ``structlog.testing.capture_logs``, which swaps the
    processors in place) and renders events at ``level`` as JSON; else ``None``."""
    sink: _TeeLogger | None = _state.get("sink")
    if sink is None or _LEVELS.get(level) is None:
        return None
    config = structlog.get_config()
    if (config["logger_factory"] is not _state["factory"]
            or tuple(config["processors"]) != _state["processors"]):
        return None
    if sink.console is not None and _LEVELS[level] >= sink.min_level:
        return None  # a person's terminal gets the console rendering, event by event
    return sink, _state["redactor"], _state["processors"]


@contextmanager
def item_events(event: str, *, level: str = "info") -> Iterator[Callable[..., None]]:
    """``with item_events("tenant_hour") as emit: emit(tenant=…, hour=…)``: one ``event`` per
    item of a batch, at ``level``, each line as ``log.<level>(event, **fields)`` would write it.

    Under :func:`configure_logging`'s configuration this is the fast path: the configured
    processors run once, when the block starts, on the fields every line shares (the context
    bound then — ``job``, ``run_id``, ``logical_time`` —, the level); each line gets its own
    timestamp and its fields redacted by the same redactor, is rendered as JSON exactly as
    :class:`_TeeLogger` renders an event, and lines are written and flushed
    :data:`ITEM_LINES_PER_WRITE` at a time and when the block ends (also when it raises).
    Any other configuration (structlog's defaults, ``capture_logs`` in tests) and a console
    rendering get one ordinary event per call.
    """
    fast = _fast_sink(level)
    log = structlog.get_logger()
    if fast is None:
        method = getattr(log, level)

        def emit_one(**fields: Any) -> None:
            method(event, **fields)

        yield emit_one
        return
    sink, redact, processors = fast
    shared: dict[str, Any] = {"event": event}
    for processor in processors:  # merge_contextvars, add_log_level, stamper, …, redactor
        shared = processor(None, level, shared)
    shared.pop("timestamp", None)
    shared_keys = frozenset(shared) | {"timestamp"}
    rendered = _ENCODER.encode(shared)
    tail = rendered[1:-1] + ', "timestamp": "'
    head_tail = ", " + tail
    stamp = _STAMPER.__call__
    lines: list[str] = []

    def emit(**fields: Any) -> None:
        if not shared_keys.isdisjoint(fields):
            # A field that overrides a shared one (rare): rendered the ordinary way, in order.
            sink.write_lines(lines, level)
            lines.clear()
            getattr(log, level)(event, **fields)
            return
        body = _ENCODER.encode(redact(None, level, fields))
        when = stamp(None, level, {})["timestamp"]
        line = (body[:-1] + head_tail if fields else "{" + tail) + when + '"}'
        lines.append(_json_safe(line))
        if len(lines) >= ITEM_LINES_PER_WRITE:
            sink.write_lines(lines, level)
            lines.clear()

    try:
        yield emit
    finally:
        sink.write_lines(lines, level)
