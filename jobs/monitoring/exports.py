"""Delivering the job metrics: Mackerel (checkpointed) and the Prometheus textfile.

The Mackerel checkpoint (``export_checkpoints``) advances only to what the API accepted, so a
failure never loses points, and re-running an export after success posts nothing new.
Settings come from the environment and the API key is never logged:

| variable                    | meaning                                            |
|-----------------------------|----------------------------------------------------|
| MACKEREL_API_KEY            | enables the Mackerel export                        |
| MACKEREL_API_BASE           | default ``https://api.mackerelio.com``             |
| HOSTMETER_MACKEREL_SERVICE  | the Mackerel service (default ``hostmeter``)       |
| HOSTMETER_PROMETHEUS_TEXTFILE | where ``aggregate-job-logs`` writes the textfile |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from jobs.monitoring.logmetrics import job_statuses, malformed_total, months, read_points
from jobs.monitoring.store import export_checkpoints
from jobs.runtime.errors import BadTrigger
from metering.db import reading, upsert

__all__ = ["MackerelSettings", "export_mackerel", "prometheus_registry", "write_prometheus"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MackerelSettings:
    """Where to post; ``repr`` never shows the key."""

    api_key: str
    base_url: str = "https://api.mackerelio.com"
    service: str = "hostmeter"

    def __repr__(self) -> str:
        return f"MackerelSettings(base_url={self.base_url!r}, service={self.service!r})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MackerelSettings | None:
        env = os.environ if env is None else env
        key = env.get("MACKEREL_API_KEY")
        if not key:
            return None
        return cls(api_key=key,
                   base_url=env.get("MACKEREL_API_BASE") or "https://api.mackerelio.com",
                   service=env.get("HOSTMETER_MACKEREL_SERVICE") or "hostmeter")


def _checkpoint(engine: Engine, exporter: str) -> tuple[datetime | None, bool]:
    with reading(engine) as conn:
        row = conn.execute(sa.select(export_checkpoints.c.sent_until,
                                     export_checkpoints.c.graphs_posted)
                           .where(export_checkpoints.c.exporter == exporter)).one_or_none()
    return (row[0], bool(row[1])) if row is not None else (None, False)


def _save(engine: Engine, exporter: str, sent_until: datetime | None, graphs: bool,
          now: datetime) -> None:
    with engine.begin() as conn:
        upsert(conn, export_checkpoints, [{"exporter": exporter, "sent_until": sent_until,
                                           "graphs_posted": graphs, "updated_at": now}],
               key=["exporter"], update=["sent_until", "graphs_posted", "updated_at"])


def export_mackerel(engine: Engine, settings: MackerelSettings, *, now: datetime,
                    client: Any = None) -> dict[str, Any]:
    """Post the points newer than the checkpoint; advance it to what was accepted."""
    from jobs.monitoring.mackerel import MackerelError, MackerelExporter

    since, graphs = _checkpoint(engine, "mackerel")
    points = read_points(engine, since=since)
    exporter = MackerelExporter(settings.api_key, settings.service, base_url=settings.base_url,
                                client=client, clock=lambda: now)
    try:
        if not graphs:
            graphs = exporter.post_graph_definitions()
        result = exporter.export(points)
    except MackerelError as exc:
        sent = exc.sent_until
        _save(engine, "mackerel", max(filter(None, (since, sent)), default=None), graphs, now)
        raise
    finally:
        exporter.close()
    newest = result.last_time or max((p.time for p in points), default=None)
    _save(engine, "mackerel", max(filter(None, (since, newest)), default=None), graphs, now)
    return {"mackerel_sent": result.sent, "mackerel_skipped_old": result.skipped_old}


def prometheus_registry(engine: Engine, zone: Any) -> Any:
    """A fresh registry of the current job statuses and billing months."""
    from jobs.monitoring.prometheus import build_registry

    return build_registry(job_statuses(engine), months(engine, zone),
                          malformed_lines=malformed_total(engine))


def write_prometheus(engine: Engine, zone: Any, path: Path) -> dict[str, Any]:
    from jobs.monitoring.prometheus import write_textfile

    if not path.parent.is_dir():
        raise BadTrigger(f"textfile directory {path.parent} does not exist", path=str(path))
    write_textfile(str(path), prometheus_registry(engine, zone))
    return {"prometheus_textfile": str(path)}
