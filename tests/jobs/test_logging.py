from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import structlog

from jobs.runtime.logconfig import configure_logging, register_secrets


def test_secrets_never_reach_a_log_sink(tmp_path: Path) -> None:
    stream = io.StringIO()
    path = configure_logging(str(tmp_path), stream=stream)
    structlog.get_logger().info(
        "connected",
        database_url="postgresql+psycopg://billing:hunter2@db.internal/hostmeter",
        api_key="mkr-abc123",
        headers={"X-Api-Key": "mkr-abc123", "Accept": "json"},
        note="retry postgresql://u:pw9@h/d later",
    )
    assert path is not None
    written = path.read_text() + stream.getvalue()
    for secret in ("hunter2", "mkr-abc123", "pw9"):
        assert secret not in written
    event = json.loads(path.read_text().splitlines()[-1])
    assert event["event"] == "connected" and event["level"] == "info" and "timestamp" in event
    assert event["database_url"] == "postgresql+psycopg://billing:***@db.internal/hostmeter"
    assert event["api_key"] == "***" and event["headers"]["Accept"] == "json"
    configure_logging(None, stream=io.StringIO())


def test_a_password_with_an_at_sign_is_hidden_whole(tmp_path: Path) -> None:
    path = configure_logging(str(tmp_path), stream=io.StringIO())
    structlog.get_logger().info("retrying", note="connect postgresql://app:p@ss-word9@h/db failed",
                                target="'postgresql+psycopg://app:x@y@z-word7@h/db'")
    configure_logging(None, stream=io.StringIO())
    assert path is not None
    written = path.read_text()
    for fragment in ("p@ss-word9", "ss-word9", "z-word7"):
        assert fragment not in written
    assert "postgresql://app:***@h/db failed" in written


def test_the_process_secrets_are_hidden_wherever_they_appear(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MACKEREL_API_KEY", "hm-secret-key-0123456789")
    monkeypatch.setenv("HOSTMETER_DATABASE_URL", "postgresql+psycopg://app:p%40ss-word1@h/db")
    monkeypatch.setenv("HOSTMETER_REDIS_URL", "rediss://:redis-token-5678@cache.internal:6379/0")
    stream = io.StringIO()
    path = configure_logging(str(tmp_path), stream=stream, secrets=["given-secret-42"])
    log = structlog.get_logger()
    log.warning("export_failed", reason="401 for key hm-secret-key-0123456789",
                detail=["password p@ss-word1 refused", {"also": "p%40ss-word1"}],
                extra="given-secret-42", redis="AUTH redis-token-5678 refused")
    configure_logging(None, stream=io.StringIO())
    assert path is not None
    written = path.read_text() + stream.getvalue()
    for secret in ("hm-secret-key-0123456789", "p@ss-word1", "p%40ss-word1", "given-secret-42",
                   "redis-token-5678"):
        assert secret not in written
    event = json.loads(path.read_text().splitlines()[-1])
    assert event["reason"] == "401 for key ***" and event["extra"] == "***"


def test_names_in_log_lines_cannot_drive_a_terminal(tmp_path: Path) -> None:
    hostile = "acme\x1b]0;owned\x07\x9b2J\u202edcba"
    path = configure_logging(str(tmp_path), stream=io.StringIO())
    structlog.get_logger().warning("tenant_failed", tenant=hostile)
    configure_logging(None, stream=io.StringIO())
    assert path is not None
    line = path.read_text().splitlines()[-1]
    for raw in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert raw not in line  # escaped as \u001b… in the JSON text
    assert json.loads(line)["tenant"] == hostile  # and read back exactly

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    configure_logging(str(tmp_path), stream=terminal, stderr_level="warning")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger().error("job_error", tenant=hostile, exc_info=True)
    configure_logging(None, stream=io.StringIO())
    shown = terminal.getvalue()
    for raw in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert raw not in shown
    assert "acme\\x1b]0;owned\\x07\\x9b2J\\u202edcba" in shown
    # the traceback goes to the log file, not to the terminal
    assert "Traceback" not in shown and "Traceback" in path.read_text()


def test_library_warnings_become_redacted_log_events(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    path = configure_logging(str(tmp_path), stream=stream, secrets=["lib-secret-77"])
    logging.getLogger("psycopg").warning("error ignored terminating %s: lost (%s)",
                                         "<psycopg.Pipeline [BAD]>", "lib-secret-77")
    configure_logging(None, stream=io.StringIO())
    assert path is not None
    [event] = [json.loads(ln) for ln in path.read_text().splitlines()
               if '"library_log"' in ln]
    assert event["logger"] == "psycopg" and event["level"] == "info"
    assert event["message"] == "error ignored terminating <psycopg.Pipeline [BAD]>: lost (***)"
    captured = capsys.readouterr()
    assert "error ignored" not in captured.err  # no raw line beside the one-line error
    assert all(ln.startswith("{") for ln in stream.getvalue().splitlines())


def test_secrets_learned_later_are_hidden_too(tmp_path: Path) -> None:
    path = configure_logging(str(tmp_path), stream=io.StringIO())
    register_secrets(["fetched-from-ssm-91", "ab"])  # e.g. a key read from SSM after start
    structlog.get_logger().info("fetched", note="value fetched-from-ssm-91 ab")
    configure_logging(None, stream=io.StringIO())
    assert path is not None
    event = json.loads(path.read_text().splitlines()[-1])
    assert event["note"] == "value *** ab"  # two characters are not worth hiding
