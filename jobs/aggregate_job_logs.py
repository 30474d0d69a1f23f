"""``aggregate-job-logs`` (every 5 minutes): job logs → job metrics → exports.

Reads the JSON logs under ``HOSTMETER_LOG_DIR`` from their checkpoints (see
:mod:`jobs.logmetrics`), then exports: to Mackerel when ``MACKEREL_API_KEY`` is set, and to the
Prometheus textfile when ``HOSTMETER_PROMETHEUS_TEXTFILE`` is set. An export that fails fails
the run (exit 1) after the metrics are stored; its checkpoint keeps what was not delivered.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from jobs.exports import MackerelSettings, export_mackerel, write_prometheus
from jobs.logmetrics import aggregate
from jobs.runtime import JobContext

__all__ = ["run"]


def run(ctx: JobContext, logical_time: datetime, *, logs: Sequence[str] = (),
        exports: Sequence[str] | None = None) -> dict[str, Any]:
    paths = [Path(p) for p in logs] or [Path(ctx.settings.log_dir)]
    now = ctx.clock()
    result = aggregate(ctx.engine, paths, now=now)
    counts: dict[str, Any] = {"files": result.files, "lines": result.lines,
                              "runs": result.runs, "malformed_lines": result.malformed,
                              "metrics": result.metrics}
    textfile = os.environ.get("HOSTMETER_PROMETHEUS_TEXTFILE")
    mackerel = MackerelSettings.from_env()
    wanted = list(exports) if exports is not None else (
        (["mackerel"] if mackerel else []) + (["prometheus"] if textfile else []))
    for name in wanted:
        if name == "mackerel":
            if mackerel is None:
                raise ValueError("--export mackerel needs MACKEREL_API_KEY")
            counts.update(export_mackerel(ctx.engine, mackerel, now=now))
        elif name == "prometheus":
            target = Path(textfile or Path(ctx.settings.log_dir) / "hostmeter.prom")
            counts.update(write_prometheus(ctx.engine, ctx.settings.zone, target))
    return counts
