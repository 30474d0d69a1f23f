"""``hostmeter bench``: the benchmark's command line (the bench itself is
:mod:`jobs.synthetic.bench`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from jobs.cli.errors import EXIT_BAD_INPUT, EXIT_FAILED, fail
from jobs.cli.state import current_state
from jobs.synthetic.bench.tiers import DEFAULT_PERIOD, TIERS, BenchRefused

__all__ = ["bench_command"]


@click.command("bench")
@click.option("--tier", type=click.Choice(list(TIERS)), default="small", show_default=True,
              help="Fleet size: small (CI), medium (2,000 tenants, 30,000 hosts, a month) or "
                   "large (20,000 tenants, 300,000 hosts: a day of host-hours, a month of "
                   "snapshots; PostgreSQL only).")
@click.option("--period", default=DEFAULT_PERIOD, show_default=True, metavar="YYYY-MM",
              help="Month to generate and snapshot (in the billing time zone).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the JSON document to FILE.")
@click.option("--startup-repeats", type=click.IntRange(0, 100), default=7, show_default=True,
              help="Times each start-up path is run (hostmeter --help, the Lambda handler's "
                   "import, a scheduled run) beside the floor; 0 skips it.")
@click.option("--redis-url", metavar="URL",
              help="Redis for the hot-path step (default: HOSTMETER_REDIS_URL; neither: a "
                   "private redis-server started on a spare loopback port, if one is on PATH, "
                   "else the step is skipped). A Redis that holds any key is refused (the step "
                   "is skipped); the keys bench writes are deleted afterwards.")
@click.option("--startup-only", is_flag=True,
              help="Only time start-up (in a scratch directory); the database is not touched.")
@click.option("--job-logs-only", is_flag=True,
              help="Only time aggregate-job-logs on a synthetic job log of --job-log-runs runs "
                   "(four lines each) beside a bare json.loads parse of it, then a pass with "
                   "nothing new; what it stores (dated 2001) is deleted afterwards.")
@click.option("--job-log-runs", type=click.IntRange(1, 10_000_000), default=100_000,
              show_default=True, help="Runs in the synthetic job log of --job-logs-only.")
def bench_command(tier: str, period: str, out_path: Path | None, startup_repeats: int,
                  redis_url: str | None, startup_only: bool, job_logs_only: bool,
                  job_log_runs: int) -> None:
    """Time start-up, ingest, a month of snapshots, the close and the Redis hot path on a
    generated fleet; print JSON.

    \b
    WRITES INTO THE CONFIGURED DATABASE: a synthetic fleet (tenants bench-*),
    replacing the previous bench data. Refuses a database that holds any
    other tenant. Exit 1 when a correctness check fails.
    --startup-only writes nothing there.
    """
    from jobs.cli.console import progress
    from jobs.synthetic.bench.report import run_bench
    from jobs.synthetic.bench.startup import time_startup
    from metering.errors import InvalidWindow
    from metering.timeutil import parse_period

    try:
        parse_period(period)  # a bad period fails before any work
    except InvalidWindow as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    if startup_only:
        startup = time_startup(repeats=max(1, startup_repeats), progress_factory=progress)
        _emit({"bench": "hostmeter", "startup": startup.as_dict()}, out_path)
        return
    state = current_state()
    if job_logs_only:
        import tempfile

        from jobs.synthetic.bench.joblogs import time_job_logs

        with tempfile.TemporaryDirectory(prefix="hostmeter-bench-logs-") as scratch:
            timing = time_job_logs(Path(scratch), state.engine(), state.settings.database_url,
                                   runs=job_log_runs)
        _emit({"bench": "hostmeter", "backend": state.engine().dialect.name,
               "job_logs": timing.as_dict()}, out_path)
        return
    if tier == "large" and not state.settings.database_url.startswith("postgresql"):
        fail("the large tier runs on PostgreSQL (the production backend); on SQLite use "
             "--tier medium", EXIT_BAD_INPUT)
    try:
        report = run_bench(state.engine(), state.settings, TIERS[tier], period=period,
                           progress_factory=progress, startup_repeats=startup_repeats,
                           redis_url=redis_url or state.settings.redis_url,
                           redis_cluster=state.settings.redis_cluster)
    except BenchRefused as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    _emit(report.as_dict(), out_path)
    if not report.ok:
        failed = [c.name for c in report.checks if not c.ok]
        if report.snapshot.status != "succeeded":
            failed.insert(0, f"snapshot-usage {report.snapshot.status}: {report.snapshot.error}")
        fail("bench checks failed: " + "; ".join(failed), EXIT_FAILED)


def _emit(document: dict[str, object], out_path: Path | None) -> None:
    text = json.dumps(document, indent=2)
    click.echo(text)
    if out_path is not None:
        out_path.write_text(text + "\n", encoding="utf-8")
