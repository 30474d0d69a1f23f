"""structlog, configured once: JSON lines to a file under HOSTMETER_LOG_DIR and to stderr.

stderr gets JSON lines too, or a console rendering when it is a terminal. A redaction processor
runs before any renderer, so secrets (API keys, passwords in database URLs) never reach a sink.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

__all__ = ["configure_logging", "redact_secrets"]

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_SECRET_KEYS = re.compile(r"(api[_-]?key|password|passwd|secret|token|authorization)", re.I)
_URL_PASSWORD = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]+)@", re.I
)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", value)
    if isinstance(value, dict):
        return {k: "***" if _SECRET_KEYS.search(str(k)) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Replace values of secret-looking keys and passwords inside URLs with ``***``."""
    return {
        k: "***" if _SECRET_KEYS.search(k) and v is not None else _scrub(v)
        for k, v in event_dict.items()
    }


class _TeeLogger:
    """Writes each event as a JSON line to a file and renders it to stderr."""

    def __init__(self, file: TextIO | None, stream: TextIO, console: bool, min_level: int) -> None:
        self.file = file
        self.stream = stream
        self.console = structlog.dev.ConsoleRenderer(colors=False) if console else None
        self.min_level = min_level

    def _emit(self, event_dict: EventDict) -> None:
        line = json.dumps(event_dict, default=str, ensure_ascii=False)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
        if _LEVELS.get(str(event_dict.get("level")), 20) >= self.min_level:
            text = self.console(None, "", dict(event_dict)) if self.console else line
            self.stream.write(str(text) + "\n")
            self.stream.flush()

    def msg(self, **event_dict: Any) -> None:
        self._emit(event_dict)

    debug = info = warning = warn = error = critical = exception = log = msg


_state: dict[str, Any] = {}


def configure_logging(
    log_dir: str | None = None,
    *,
    stream: TextIO | None = None,
    stderr_level: str = "info",
    file_name: str = "hostmeter.jsonl",
) -> Path | None:
    """Configure structlog for this process (again, if called again). Returns the log file."""
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
    out = stream or sys.stderr
    console = out.isatty() and os.environ.get("HOSTMETER_LOG_FORMAT") != "json"
    sink = _TeeLogger(file, out, console, _LEVELS.get(stderr_level, 20))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(10),
        logger_factory=lambda *_: sink,
        cache_logger_on_first_use=False,
    )
    return path
