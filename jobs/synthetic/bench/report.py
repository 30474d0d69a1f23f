"""One bench run end to end (:func:`run_bench`) and the document it prints
(:class:`BenchReport`)."""

from __future__ import annotations

import platform
import sqlite3
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine

from jobs.synthetic.bench.checks import Check, invoices_check, run_checks
from jobs.synthetic.bench.generate import (
    GenerateResult,
    fill_month,
    generate_fleet,
    table_counts,
)
from jobs.synthetic.bench.hotpath import HotPathReport, time_hot_path
from jobs.synthetic.bench.measure import (
    CloseTiming,
    IngestTiming,
    SnapshotTiming,
    time_close,
    time_ingest,
    time_snapshots,
)
from jobs.synthetic.bench.memory import PeakRSS, release_freed
from jobs.synthetic.bench.posts import (
    ParallelTiming,
    PostsTiming,
    time_ingest_file,
    time_parallel,
    write_posts,
)
from jobs.synthetic.bench.startup import StartupTiming, time_startup
from jobs.synthetic.bench.tiers import DEFAULT_PERIOD, BenchTier, Progress, no_progress
from metering import db
from metering import models as m
from metering.settings import Settings
from metering.timeutil import HOUR, floor_hour, hours_between, month_bounds

__all__ = ["BenchReport", "run_bench"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchReport:
    """Everything one bench run measured and checked."""

    tier: BenchTier
    period: str
    billing_tz: str
    database: str
    backend: str
    server_version: str
    start: datetime
    end: datetime
    generated: GenerateResult
    ingest: IngestTiming
    ingest_single: IngestTiming
    snapshot: SnapshotTiming
    close: CloseTiming | None
    checks: list[Check]
    database_counts: dict[str, int]
    startup: StartupTiming | None = None
    posts: PostsTiming | None = None
    parallel: ParallelTiming | None = None
    parallel_note: str | None = None
    hot_path: HotPathReport | None = None
    fill_s: float | None = None
    peak_rss_mib: dict[str, float | None] = field(default_factory=dict)
    start_rss_mib: dict[str, float | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        closed = self.close is None or self.close.status == "succeeded"
        return self.snapshot.status == "succeeded" and closed and all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        t = self.tier
        return {
            "bench": "hostmeter",
            "ok": self.ok,
            "tier": t.name,
            "size": {"tenants": t.tenants, "hosts": t.hosts, "hours": self.snapshot.hours},
            "period": self.period,
            "billing_tz": self.billing_tz,
            "window": [self.start.isoformat(), self.end.isoformat()],
            "backend": self.backend,
            "server_version": self.server_version,
            "database": self.database,
            "python": platform.python_version(),
            "sqlalchemy": sa.__version__,
            "generate": {
                "generate_s": self.generated.generate_s,
                "cleanup_s": self.generated.cleanup_s,
                "steps_s": self.generated.steps_s,
                "rows": self.generated.counts,
            },
            "ingest": {**self.ingest.as_dict(), "single_post_calls": self.ingest_single.as_dict()},
            "ingest_file": self.posts.as_dict() if self.posts else None,
            "ingest_parallel": (self.parallel.as_dict() if self.parallel
                                else {"skipped": self.parallel_note}),
            "snapshot": self.snapshot.as_dict(),
            "hot_path": self.hot_path.as_dict() if self.hot_path else None,
            "month_filled_s": round(self.fill_s, 3) if self.fill_s is not None else None,
            "peak_rss_mib": {**self.peak_rss_mib,
                             "ingest_file": self.posts.ingest.peak_rss_mib if self.posts else None,
                             "ingest_file_first_hour": (self.posts.cold.peak_rss_mib
                                                        if self.posts else None)},
            "rss_at_step_start_mib": self.start_rss_mib,
            "close": self.close.as_dict() if self.close else None,
            "counts": self.database_counts,
            "checks": {c.name: {"ok": c.ok, **c.details} for c in self.checks},
            "startup": self.startup.as_dict() if self.startup else None,
        }


def _server_version(engine: Engine) -> str:
    if engine.dialect.name == "sqlite":
        return sqlite3.sqlite_version
    with engine.connect() as conn:
        return str(conn.exec_driver_sql("SHOW server_version").scalar_one())


def _time_files(
    engine: Engine, tier: BenchTier, start: datetime, progress_factory: Progress
) -> tuple[PostsTiming | None, ParallelTiming | None, str | None]:
    """The real ingest path: a JSON Lines file through ``hostmeter ingest`` beside a bare parse
    and, on PostgreSQL, two processes on disjoint tenants beside one."""
    if not tier.file_hosts:
        return None, None, "this tier writes no file of posts"
    url = engine.url.render_as_string(hide_password=False)
    with tempfile.TemporaryDirectory(prefix="hostmeter-bench-") as tmp, \
            progress_factory("ingest a file of posts", None):
        first, second = (
            write_posts(Path(tmp) / f"posts{i}.jsonl", tenants=tier.file_tenants,
                        hosts=tier.file_hosts, start=start + i * tier.file_hours * HOUR,
                        hours=tier.file_hours)
            for i in range(2)
        )
        posts = time_ingest_file(first, second, url)
        first.path.unlink()
        second.path.unlink()
        if engine.dialect.name != "postgresql":
            return posts, None, ("SQLite admits one writer at a time: two ingest processes "
                                 "run one after the other by design")
        parallel = time_parallel(Path(tmp), url, tenants=tier.file_tenants,
                                 hosts=tier.file_hosts, start=start, hours=tier.file_hours)
    return posts, parallel, None


def run_bench(
    engine: Engine,
    settings: Settings,
    tier: BenchTier,
    *,
    period: str = DEFAULT_PERIOD,
    progress_factory: Progress = no_progress,
    startup_repeats: int = 0,
    redis_url: str | None = None,
    redis_cluster: bool = False,
) -> BenchReport:
    """Generate ``tier``'s fleet in ``engine``'s database, time ingest and snapshots, check;
    then the Redis hot path (:mod:`jobs.synthetic.bench.hotpath`: ``redis_url``, or a private
    ``redis-server``; skipped, with the reason, when there is none); with ``startup_repeats``,
    then time the entry points' start-up (:mod:`jobs.synthetic.bench.startup`).

    Raises :class:`BenchRefused` (nothing written) when the database holds non-bench tenants.
    """
    start, month_end = month_bounds(period, settings.zone)
    hour_list = list(hours_between(start, month_end))
    if tier.hours is not None:
        hour_list = hour_list[: tier.hours]
    end = hour_list[-1] + HOUR
    db.ensure_schema(engine)

    rss: dict[str, float | None] = {}
    rss_start: dict[str, float | None] = {}

    def measured(step: str, peak: PeakRSS) -> None:
        rss[step], rss_start[step] = peak.mib, peak.start_mib

    with PeakRSS() as peak:
        generated = generate_fleet(engine, tier, start, len(hour_list),
                                   progress_factory=progress_factory)
    measured("generate", peak)
    engine.dispose()  # the generator's connections (SQLite: a page cache of up to 1 GiB) go
    release_freed()
    with PeakRSS() as peak:
        ingest, single = time_ingest(engine, tier, start, len(hour_list),
                                     progress_factory=progress_factory)
    measured("ingest_api", peak)
    posts, parallel, parallel_note = _time_files(engine, tier, start, progress_factory)
    with PeakRSS() as peak:
        snapshot = time_snapshots(engine, settings, hour_list, progress_factory=progress_factory)
    measured("snapshot", peak)
    checks = run_checks(engine, start, end, len(hour_list), snapshot.run_id, generated)
    fill_s = None
    if tier.fill_month and end < month_end:
        rest = list(hours_between(end, month_end))
        fill_s = fill_month(engine, hour_list, rest, snapshot.run_id,
                            progress_factory=progress_factory)
        end = month_end
    close = None
    if end == month_end:  # a whole month was snapshotted: close it (a partial tier cannot)
        with PeakRSS() as peak:
            close = time_close(engine, settings, period)
        measured("close", peak)
        checks.append(invoices_check(engine, period, start, end, close))
    # the hot path records an hour after the month: no snapshot or invoice above reads it
    with PeakRSS() as peak:
        hot_path = time_hot_path(engine, tier, floor_hour(month_end) + HOUR,
                                 redis_url=redis_url, cluster=redis_cluster,
                                 progress_factory=progress_factory)
    if hot_path.timing is not None:
        measured("hot_path", peak)
    checks.extend(hot_path.checks)
    with engine.connect() as conn:
        counts = table_counts(conn)
        us, hh = m.usage_snapshots, m.host_hours
        counts["host_hours_in_window"] = int(conn.execute(
            sa.select(sa.func.count()).select_from(hh).where(hh.c.hour >= start, hh.c.hour < end)
        ).scalar_one())
        counts["usage_snapshots"] = int(conn.execute(
            sa.select(sa.func.count()).select_from(us).where(us.c.hour >= start, us.c.hour < end)
        ).scalar_one())
        conn.rollback()
    startup = (time_startup(repeats=startup_repeats, progress_factory=progress_factory)
               if startup_repeats else None)
    report = BenchReport(
        tier=tier, period=period, billing_tz=settings.billing_tz,
        database=db.redact_url(str(engine.url)), backend=engine.dialect.name,
        server_version=_server_version(engine), start=start, end=end, generated=generated,
        ingest=ingest, ingest_single=single, snapshot=snapshot, close=close, checks=checks,
        database_counts=counts, startup=startup, posts=posts, parallel=parallel,
        parallel_note=parallel_note, hot_path=hot_path, fill_s=fill_s, peak_rss_mib=rss,
        start_rss_mib=rss_start,
    )
    structlog.get_logger("hostmeter.bench").info(
        "bench_finished", tier=tier.name, backend=report.backend, ok=report.ok,
        generate_s=generated.generate_s, observations_per_s=report.ingest.as_dict()
        ["observations_per_s"], snapshot_s=report.snapshot.as_dict()["snapshot_s"],
        floor_s=report.snapshot.as_dict()["floor_s"],
        close_s=report.close.as_dict()["close_s"] if report.close else None,
    )
    return report


