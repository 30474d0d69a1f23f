"""``aggregate-job-logs`` (every 5 minutes): job logs → job metrics → exports.

Reads the job logs from their checkpoints (see :mod:`jobs.monitoring.logmetrics`): the JSON log
files given with ``--logs``, and the CloudWatch Logs groups given with ``--log-group`` or
``HOSTMETER_LOG_GROUPS`` (see :mod:`jobs.monitoring.cloudwatch`); when neither is given, the files
under ``HOSTMETER_LOG_DIR``. Then it exports: to Mackerel when ``MACKEREL_API_KEY`` is set, and to
the Prometheus textfile when ``HOSTMETER_PROMETHEUS_TEXTFILE`` is set. An export that fails fails
the run (exit 1) after the metrics are stored; what was not delivered is sent by the next pass.

A pass ends within ``HOSTMETER_AGGREGATE_BUDGET_S`` seconds (default 120, well inside the
5-minute schedule), counted from its start: the Mackerel export gets what the aggregation left
of it (see :mod:`jobs.monitoring.exports`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from jobs.monitoring.cloudwatch import log_groups_from_env
from jobs.monitoring.exports import (
    MackerelSettings,
    PassBudget,
    export_mackerel,
    write_prometheus,
)
from jobs.monitoring.logmetrics import aggregate
from jobs.runtime.context import JobContext

__all__ = ["run"]


def run(ctx: JobContext, logical_time: datetime, *, logs: Sequence[str] = (),
        log_groups: Sequence[str] | None = None, exports: Sequence[str] | None = None,
        logs_client: Any = None) -> dict[str, Any]:
    budget = PassBudget.from_env()
    groups = list(log_groups) if log_groups is not None else log_groups_from_env(os.environ)
    paths = [Path(p) for p in logs] or ([] if groups else [Path(ctx.settings.log_dir)])
    now = ctx.clock()
    result = aggregate(ctx.engine, paths, now=now, log_groups=groups, logs_client=logs_client)
    counts: dict[str, Any] = {"files": result.files, "lines": result.lines,
                              "runs": result.runs, "malformed_lines": result.malformed,
                              "metrics": result.metrics, "tenant_items": result.tenant_items,
                              "tenant_hours": result.tenant_hours}
    if groups:
        counts.update(log_groups=result.log_groups, log_events=result.log_events)
    textfile = os.environ.get("HOSTMETER_PROMETHEUS_TEXTFILE")
    mackerel = MackerelSettings.from_env()
    wanted = list(exports) if exports is not None else (
        (["mackerel"] if mackerel else []) + (["prometheus"] if textfile else []))
    for name in wanted:
        if name == "mackerel":
            if mackerel is None:
                raise ValueError("--export mackerel needs MACKEREL_API_KEY")
            counts.update(export_mackerel(ctx.engine, mackerel, now=now, budget=budget))
        elif name == "prometheus":
            target = Path(textfile or Path(ctx.settings.log_dir) / "hostmeter.prom")
            counts.update(write_prometheus(ctx.engine, ctx.settings.zone, target, now=now))
    return counts
