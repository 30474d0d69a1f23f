"""The job-metrics pipeline, measured: ``hostmeter metrics aggregate`` on a synthetic job log,
beside the floor of parsing the same file.

:func:`write_job_log` writes what a long-running deployment's jobs log: ``runs`` runs five
minutes apart (snapshot-usage, flush-usage, aggregate-job-logs, and a close now and then), each
``job_started``, two per-item lines (``tenant_hour``, the per-tenant line of ``snapshot-usage``)
and ``job_finished`` with its counts — four lines a run, the shape of the real logs.

:func:`time_job_logs` then measures, in one run, against the configured database:

- **the floor**: read every line of the file and ``json.loads`` it (what any reader of the
  file must at least do), in this process;
- **the first pass**: ``hostmeter metrics aggregate --logs FILE --format json`` in a new process
  (start-up included), its wall time and its own peak resident size;
- **a pass with nothing new** after that history: the same command again (wall time), and the
  pass itself in this process (:func:`jobs.monitoring.logmetrics.aggregate`), which must not
  grow with the history.

The synthetic runs are dated in 2001 and their job names start with ``bench-``; what they wrote
(runs, metrics, tenant series, checkpoints) is deleted afterwards.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from jobs.runtime.errors import JobError

__all__ = ["GOALS", "JobLogTiming", "time_job_logs", "write_job_log"]

GOALS = {"ratio": 0.5, "peak_rss_mib": 150.0, "nothing_new_s": 0.5}
START = datetime(2001, 1, 1, tzinfo=UTC)
_JOBS = ("bench-snapshot-usage", "bench-flush-usage", "bench-aggregate-job-logs")


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def write_job_log(path: Path, *, runs: int, tenants: int = 500) -> int:
    """Write ``runs`` runs (four lines each) to ``path``; returns the lines written."""
    lines = 0
    with path.open("w", encoding="utf-8") as f:
        for i in range(runs):
            at = START + timedelta(minutes=5 * i)
            job = "bench-close-billing-period" if i % 1000 == 999 else _JOBS[i % 3]
            run_id = f"bench-run-{i:08d}"
            base: dict[str, Any] = {"level": "info", "job": job, "run_id": run_id,
                                    "logical_time": _iso(at)}
            hour = at.replace(minute=0) - timedelta(hours=1)
            out: list[dict[str, Any]] = [{"event": "job_started", "timestamp": _iso(at), **base}]
            for k in range(2):
                tenant = (i * 2 + k) % tenants
                out.append({"event": "tenant_hour", "timestamp": _iso(at), **base,
                            "tenant": f"bench-t{tenant}", "hour": _iso(hour),
                            "std": 3 + tenant % 7, "micro": tenant % 3,
                            "metrics": 300 + tenant, "over": 0, "svc": 2, "mon": 1,
                            "plan": "standard"})
            done = at + timedelta(seconds=2)
            out.append({"event": "job_finished", "timestamp": _iso(done), **base,
                        "status": "succeeded" if i % 97 else "failed",
                        "duration_s": 1.5 + (i % 11) / 10, "tenants_expected": 40,
                        "tenants_processed": 40 - (i % 97 == 0), "host_hours": 1200 + i % 50,
                        "host_metrics": 90_000, "hours": 1})
            for event in out:
                f.write(json.dumps(event) + "\n")
            lines += len(out)
    return lines


def parse_floor(path: Path) -> float:
    """Seconds to read every line of ``path`` and decode it with ``json.loads``."""
    started = time.perf_counter()
    with path.open("rb") as f:
        for raw in f:
            json.loads(raw)
    return time.perf_counter() - started


@dataclass(frozen=True, slots=True, kw_only=True)
class JobLogTiming:
    runs: int
    lines: int
    bytes: int
    floor_s: float
    first_s: float
    first_peak_rss_mib: float | None
    first_summary: dict[str, Any]
    nothing_new_command_s: float
    nothing_new_pass_s: float

    def as_dict(self) -> dict[str, Any]:
        ratio = self.floor_s / self.first_s if self.first_s else None
        rss = self.first_peak_rss_mib
        return {
            "what": "hostmeter metrics aggregate --logs FILE on a synthetic job log (runs five "
                    "minutes apart: job_started, two tenant_hour lines, job_finished), a new "
                    "process, start-up included; then the same command and the pass alone with "
                    "nothing new after that history",
            "floor": "read every line of the same file and json.loads it, in one process",
            "runs": self.runs, "lines": self.lines, "bytes": self.bytes,
            "floor_s": round(self.floor_s, 3),
            "aggregate_s": round(self.first_s, 3),
            "ratio": round(ratio, 3) if ratio else None,
            "aggregate_peak_rss_mib": rss,
            "summary": self.first_summary,
            "nothing_new_command_s": round(self.nothing_new_command_s, 3),
            "nothing_new_pass_s": round(self.nothing_new_pass_s, 4),
            "goals": {"ratio": f">= {GOALS['ratio']}",
                      "peak_rss_mib": f"<= {GOALS['peak_rss_mib']:g}",
                      "nothing_new_s": f"<= {GOALS['nothing_new_s']} (the pass)"},
            "goals_met": {
                "ratio": ratio is not None and ratio >= GOALS["ratio"],
                "peak_rss_mib": rss is not None and rss <= GOALS["peak_rss_mib"],
                "nothing_new_s": self.nothing_new_pass_s <= GOALS["nothing_new_s"],
            },
        }


def _aggregate_command(path: Path, database_url: str, log_dir: Path
                       ) -> tuple[float, float | None, dict[str, Any]]:
    from jobs.synthetic.bench.memory import run_hostmeter

    env = {**os.environ, "HOSTMETER_DATABASE_URL": database_url,
           "HOSTMETER_LOG_DIR": str(log_dir)}
    return run_hostmeter("metrics", "aggregate", "--logs", str(path), env=env,
                         what="hostmeter metrics aggregate")


def clean(engine: Engine) -> None:
    """Delete what the synthetic job log put in the store (runs, metrics, tenant series and
    flags of 2001, its checkpoints)."""
    from jobs.monitoring.store import job_metrics, log_runs, tenant_flags, tenant_series

    end = START + timedelta(days=3660)
    with engine.begin() as conn:
        conn.execute(sa.delete(log_runs).where(log_runs.c.run_id.like("bench-run-%")))
        conn.execute(sa.delete(job_metrics).where(
            job_metrics.c.bucket >= START - timedelta(days=1), job_metrics.c.bucket < end))
        for table in (tenant_series, tenant_flags):  # hours start an hour before the runs
            conn.execute(sa.delete(table).where(table.c.hour >= START - timedelta(days=1),
                                                table.c.hour < end))


def time_job_logs(directory: Path, engine: Engine, database_url: str, *, runs: int
                  ) -> JobLogTiming:
    """The floor, the first pass and a pass with nothing new (see the module docstring)."""
    from jobs.monitoring.logmetrics import aggregate
    from jobs.monitoring.store import log_checkpoints

    path = directory / "bench-jobs.jsonl"
    clean(engine)
    lines = write_job_log(path, runs=runs)
    floor_s = parse_floor(path)
    try:
        first_s, peak, summary = _aggregate_command(path, database_url, directory / "logs")
        if summary.get("runs") != runs:
            raise JobError(f"the first pass read {summary.get('runs')} runs of {runs}")
        again_s, _, again = _aggregate_command(path, database_url, directory / "logs")
        if again.get("runs") or again.get("lines"):
            raise JobError(f"a pass with nothing new read {again.get('lines')} lines")
        started = time.perf_counter()
        result = aggregate(engine, [path], now=datetime.now(UTC))
        pass_s = time.perf_counter() - started
        if result.lines:
            raise JobError(f"a pass with nothing new read {result.lines} lines")
    finally:
        with engine.begin() as conn:  # the file's checkpoint: keyed by its first line
            from jobs.monitoring.logmetrics import file_checkpoint_key

            if path.exists():
                conn.execute(sa.delete(log_checkpoints).where(
                    log_checkpoints.c.path == file_checkpoint_key(path)))
        clean(engine)
    return JobLogTiming(runs=runs, lines=lines, bytes=path.stat().st_size, floor_s=floor_s,
                        first_s=first_s, first_peak_rss_mib=peak, first_summary=summary,
                        nothing_new_command_s=again_s, nothing_new_pass_s=pass_s)
