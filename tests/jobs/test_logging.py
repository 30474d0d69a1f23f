from __future__ import annotations

import io
import json
from pathlib import Path

import structlog

from jobs.runtime.logconfig import configure_logging


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
