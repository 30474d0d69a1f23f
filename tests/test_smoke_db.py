from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from metering import models as m
from metering.ingest import UsageRecorder


def test_recorder_writes_a_host_hour(engine: sa.Engine) -> None:
    UsageRecorder(engine).post_host_metrics(
        tenant="acme", host="h-1", kind="standard",
        at=datetime(2026, 10, 15, 10, 3, tzinfo=UTC), metrics=["a", "b", "a"],
    )
    with engine.connect() as conn:
        assert conn.execute(sa.select(m.host_hours.c.metric_count)).scalar_one() == 2
