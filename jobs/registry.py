"""The job registry: the one place that knows each job's name, schedule and window.

The local scheduler, the AWS entry points, ``hostmeter run`` and the infrastructure templates
read (or are tested against) this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs import snapshot_usage
from jobs.errors import UnknownJob

__all__ = ["JOBS", "JobSpec", "get"]


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """One scheduled job."""

    name: str
    schedule: str
    """EventBridge Scheduler expression, e.g. ``cron(5 * * * ? *)``."""
    timezone: str
    description: str
    run: Callable[..., dict[str, Any]]
    shardable: bool = False


JOBS: dict[str, JobSpec] = {
    spec.name: spec
    for spec in (
        JobSpec(
            name="snapshot-usage",
            schedule="cron(5 * * * ? *)",
            timezone="UTC",
            description="snapshot the previous full hour (+ look-back) into usage_snapshots",
            run=snapshot_usage.run,
        ),
    )
}


def get(name: str) -> JobSpec:
    try:
        return JOBS[name]
    except KeyError:
        raise UnknownJob(
            f"unknown job {name!r} (known jobs: {', '.join(sorted(JOBS))})", job=name
        ) from None
