from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from jobs.runtime import logconfig
from jobs.runtime.logconfig import configure_logging, item_events, register_secrets


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


# --- per-item events: the fast path writes the lines the ordinary path would ----------------

HOSTILE = "acme\x1b]0;owned\x07\x9b2J\u202e\x7f \u2028 given-secret-42 postgresql://u:pw9@h/d"
ITEM = {"tenant": HOSTILE, "hour": "2026-10-15T10:00:00Z", "std": 12, "over": 0,
        "plan": None, "amount": "12318", "nested": {"token": "t-1", "ok": [1, "x"]},
        "api_key": "mkr-abc123", "when": datetime(2026, 10, 15, tzinfo=UTC)}


@pytest.fixture
def item_log(tmp_path: Path) -> Iterator[tuple[Path, io.StringIO]]:
    stream = io.StringIO()
    path = configure_logging(str(tmp_path), stream=stream, secrets=["given-secret-42"])
    assert path is not None
    structlog.contextvars.clear_contextvars()
    yield path, stream
    structlog.contextvars.clear_contextvars()
    configure_logging(None, stream=io.StringIO())


def _without_timestamp(line: str) -> str:
    return re.sub(r', "timestamp": "[^"]+"}$', "}", line)


def test_an_item_line_is_the_line_an_ordinary_event_writes(
        item_log: tuple[Path, io.StringIO]) -> None:
    path, stream = item_log
    with structlog.contextvars.bound_contextvars(job="snapshot-usage", run_id="r-1",
                                                 logical_time="2026-10-15T10:05:00+00:00"):
        structlog.get_logger().info("tenant_hour", **ITEM)
        with item_events("tenant_hour") as emit:
            emit(**ITEM)
            emit()
    ordinary, fast, bare = path.read_text(encoding="utf-8").splitlines()
    assert _without_timestamp(fast) == _without_timestamp(ordinary)  # text, order and escapes
    event = json.loads(fast)
    assert event["tenant"] == HOSTILE.replace("given-secret-42", "***").replace("pw9", "***")
    assert event["api_key"] == "***" and event["nested"]["token"] == "***"
    assert event["when"] == "2026-10-15 00:00:00+00:00"  # str() of what JSON cannot hold
    keys = list(event)
    assert keys[-6] == "event" and keys[-2:] == ["level", "timestamp"]
    assert set(keys[-5:-2]) == {"job", "logical_time", "run_id"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", event["timestamp"])
    for raw in ("\x1b", "\x07", "\x9b", "\u202e", "\x7f", "\u2028"):
        assert raw not in fast
    assert json.loads(bare) == {"event": "tenant_hour", "job": "snapshot-usage",
                                "logical_time": "2026-10-15T10:05:00+00:00", "run_id": "r-1",
                                "level": "info", "timestamp": json.loads(bare)["timestamp"]}
    assert stream.getvalue().splitlines() == [ordinary, fast, bare]  # info reaches stderr


def test_item_lines_are_written_in_blocks_and_when_the_block_fails(
        item_log: tuple[Path, io.StringIO], monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = item_log
    monkeypatch.setattr(logconfig, "ITEM_LINES_PER_WRITE", 3)

    def written() -> list[int]:
        return [json.loads(ln)["n"] for ln in path.read_text().splitlines()]

    with pytest.raises(RuntimeError, match="item 5 failed"), item_events("item") as emit:
        for n in range(7):
            if n == 5:
                raise RuntimeError("item 5 failed")
            emit(n=n)
            assert written() == list(range(n + 1 - (n + 1) % 3))  # whole blocks only
    assert written() == [0, 1, 2, 3, 4]  # the rest when the block ends


def test_a_field_that_overrides_a_bound_one_keeps_its_place(
        item_log: tuple[Path, io.StringIO]) -> None:
    path, _ = item_log
    with structlog.contextvars.bound_contextvars(job="ingest"), \
            item_events("tenant_ingested", level="debug") as emit:
        emit(tenant="a")
        emit(tenant="b", job="other")  # as an ordinary event: the field wins over the context
        emit(tenant="c")
    events = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert [(e["tenant"], e["job"], e["level"]) for e in events] == [
        ("a", "ingest", "debug"), ("b", "other", "debug"), ("c", "ingest", "debug")]


def test_debug_item_lines_stay_off_stderr(item_log: tuple[Path, io.StringIO]) -> None:
    path, stream = item_log
    with item_events("detail", level="debug") as emit:
        emit(n=1)
    assert len(path.read_text().splitlines()) == 1 and stream.getvalue() == ""


def test_item_events_under_capture_logs_and_on_a_terminal(tmp_path: Path) -> None:
    configure_logging(str(tmp_path), stream=io.StringIO())
    try:
        with capture_logs() as captured, item_events("tenant_hour") as emit:
            emit(tenant="acme", std=1)
        assert captured == [{"tenant": "acme", "std": 1, "event": "tenant_hour",
                             "log_level": "info"}]

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        terminal = Terminal()
        path = configure_logging(str(tmp_path / "tty"), stream=terminal)
        with item_events("tenant_hour") as emit:
            emit(tenant="acme\x1b[2J", std=1)
        shown = terminal.getvalue()
        assert "tenant_hour" in shown and not shown.startswith("{") and "\x1b" not in shown
        assert path is not None
        assert json.loads(path.read_text())["tenant"] == "acme\x1b[2J"
    finally:
        configure_logging(None, stream=io.StringIO())
