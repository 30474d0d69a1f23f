"""run_job: a failed run's error is one short line, without SQL text or bound parameters."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from jobs.runtime.context import JobContext, run_job
from jobs.runtime.logconfig import configure_logging
from metering import models as m
from metering.settings import Settings

CUSTOMER = "tenant-acme-confidential"


def test_a_database_failure_is_one_line_in_the_result_and_in_job_finished(
        engine: Engine, tmp_path: Path) -> None:
    log_file = configure_logging(str(tmp_path / "logs"), stream=io.StringIO())
    assert log_file is not None
    with engine.begin() as conn:
        conn.execute(sa.insert(m.tenants).values(key=CUSTOMER))

    def body(ctx: JobContext, logical_time: datetime, **_: Any) -> dict[str, Any]:
        with ctx.engine.begin() as conn:  # a real driver error: a duplicate key
            conn.execute(sa.insert(m.tenants).values(key=CUSTOMER))
        return {}

    ctx = JobContext(engine=engine, settings=Settings())
    result = run_job("test-job", body, ctx, datetime(2026, 10, 1, tzinfo=UTC))
    configure_logging(None, stream=io.StringIO())

    assert result.status == "failed" and isinstance(result.exception, sa.exc.IntegrityError)
    assert result.error is not None and result.error.startswith("IntegrityError: ")
    assert "\n" not in result.error and len(result.error) <= 300
    for leak in ("[SQL", "parameters", "INSERT INTO", CUSTOMER):
        assert leak not in result.error, result.error
    finished = [json.loads(ln) for ln in log_file.read_text().splitlines()
                if '"job_finished"' in ln]
    assert [e["error"] for e in finished] == [result.error]


def test_a_long_multi_line_error_is_cut_to_its_first_line(engine: Engine) -> None:
    def body(ctx: JobContext, logical_time: datetime, **_: Any) -> dict[str, Any]:
        raise RuntimeError("x" * 5000 + "\nsecond line")

    result = run_job("test-job", body, JobContext(engine=engine, settings=Settings()),
                     datetime(2026, 10, 1, tzinfo=UTC))
    assert result.error is not None
    assert result.error.startswith("RuntimeError: xxx") and "second line" not in result.error
    assert result.error.endswith("chars)") and len(result.error) < 330
