"""``hostmeter run``, ``backfill``, ``runs`` and ``scheduler``: running registered jobs through
the run ledger (:mod:`jobs.triggers.runner`), by hand or on their schedule."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from jobs import registry
from jobs.cli.errors import EXIT_BAD_INPUT, EXIT_FAILED, fail, raise_known
from jobs.cli.state import current_state, parse_at
from jobs.runtime.ledger import RUN_STATUSES
from jobs.runtime.locks import DEFAULT_WAIT_S
from metering.display import escape_controls, quote_name
from metering.snapshot import DEFAULT_LOOKBACK
from metering.timeutil import floor_hour, month_bounds

if TYPE_CHECKING:
    from jobs.runtime.context import JobResult
    from jobs.triggers.runner import RunOutcome

__all__ = ["backfill", "run_cmd", "runs_cmd", "scheduler_cmd"]


def _finish(result: JobResult, fmt: str = "table") -> None:
    if fmt == "json":
        click.echo(json.dumps({
            "job": result.job, "run_id": result.run_id,
            "logical_time": result.logical_time.isoformat(), "status": result.status,
            "duration_s": result.duration_s, "counts": result.counts, "error": result.error,
        }, default=str))
    else:
        counts = ", ".join(f"{k}={v}" for k, v in result.counts.items())
        click.echo(escape_controls(
            f"{result.job} {result.status} in {result.duration_s:.2f}s: {counts}"))
    if not result.ok:
        fail(f"{result.job} {result.status}: {result.error or 'see logs'}", EXIT_FAILED)


@click.command("run")
@click.argument("job")
@click.option("--at", "at", metavar="ISO8601",
              help="Logical (scheduled) time, e.g. <aws.scheduler.scheduled-time>. Default: now.")
@click.option("--period", metavar="YYYY-MM",
              help="Monthly jobs: the month (default: the month before --at).")
@click.option("--tenant", "tenants", multiple=True, metavar="ID",
              help="Monthly jobs: only this tenant (repeatable; not recorded as the period's run).")
@click.option("--shard", metavar="I/N", help="Work on shard I of N (0-based) of the tenants.")
@click.option("--dry-run", is_flag=True, help="Monthly jobs: compute and show, write nothing.")
@click.option("--force", is_flag=True, help="Run even if this key already succeeded.")
@click.option("--retry-failed", is_flag=True,
              help="Instead of --at: run again every key of JOB whose last attempt failed or "
              "ended partial.")
@click.option("--trigger", type=click.Choice(["manual", "schedule", "retry"]), default="manual",
              show_default=True, help="Recorded in the ledger (EventBridge passes schedule).")
@click.option("--lookback", type=click.IntRange(0, 48), default=DEFAULT_LOOKBACK,
              show_default=True, help="snapshot-usage: earlier hours to re-snapshot.")
@click.option("--wait", "wait_s", type=click.FloatRange(0), default=DEFAULT_WAIT_S,
              show_default=True, help="Seconds to wait for a run of the same key to finish.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def run_cmd(job: str, at: str | None, period: str | None, tenants: tuple[str, ...],
            shard: str | None, dry_run: bool, force: bool, retry_failed: bool, trigger: str,
            lookback: int, wait_s: float, fmt: str) -> None:
    """Run JOB once for the logical time --at (what EventBridge Scheduler runs).

    \b
    Jobs:
      snapshot-usage        the full hour before --at plus --lookback earlier hours
      close-billing-period  the month before --at (or --period): draft invoices
      finalize-invoices     the month before --at (or --period): drafts become final

    Every run is recorded in the ledger (`hostmeter runs`). A key (job, window,
    shard) that already succeeded is skipped (exit 0) unless --force; a second
    trigger for a key that is running waits for it; a run killed mid-way is
    retried by the next trigger. --dry-run and --tenant runs are not recorded.
    """
    from jobs.runtime.context import JobContext, run_job
    from jobs.triggers.runner import RunRequest, Shard, execute, parse_shard

    spec = registry.get(job)
    if retry_failed:
        if at or period or tenants or shard or dry_run or force:
            fail("--retry-failed takes no --at, --period, --tenant, --shard, --dry-run or "
                 "--force: it retries what the ledger says failed", EXIT_BAD_INPUT)
        _retry_failed(spec.name, wait_s, fmt)
        return
    logical = parse_at(at)
    given = {"period": period, "tenants": tenants, "dry_run": dry_run, "shard": shard}
    unused = [f"--{k.replace('_', '-').rstrip('s')}" for k, v in given.items()
              if v and k not in spec.options and not (k == "shard" and spec.shardable)]
    if unused:
        fail(f"job {spec.name} takes no {', '.join(unused)}", EXIT_BAD_INPUT)
    options: dict[str, Any] = {k: v for k, v in given.items()
                               if k in spec.options and v not in (None, (), False)}
    if "lookback" in spec.options:
        options["lookback"] = lookback
    if period is not None:
        month_bounds(period, current_state().settings.zone)  # a bad period is bad input
    the_shard = parse_shard(shard) if shard else Shard()
    engine = current_state().engine()
    settings = current_state().settings
    if dry_run or tenants:
        ctx = JobContext(engine=engine, settings=settings)
        if spec.shardable:
            options["shard"] = the_shard
        result = run_job(spec.name, spec.run, ctx, logical, **options)
        raise_known(result.exception)
        _finish(result, fmt)
        return
    outcome = execute(engine, settings, RunRequest(
        job=spec.name, scheduled_time=logical, trigger=trigger, shard=the_shard, force=force,
        options=options), wait_s=wait_s)
    raise_known(outcome.exception)
    _print_outcome(outcome, fmt)


def _retry_failed(job: str, wait_s: float, fmt: str) -> None:
    from jobs.triggers.runner import execute, failed_keys

    engine = current_state().engine()
    settings = current_state().settings
    requests = failed_keys(engine, job, settings.zone)
    if not requests:
        click.echo(f"{job}: nothing to retry" if fmt == "table" else "[]")
        return
    outcomes = [execute(engine, settings, r, wait_s=wait_s) for r in requests]
    if fmt == "json":
        click.echo(json.dumps([o.as_dict() for o in outcomes], default=str))
    else:
        for o in outcomes:
            click.echo(escape_controls(
                f"{o.job} {o.status} [{o.shard}] {o.logical_time.isoformat()} "
                f"attempt {o.attempt}" + (f": {o.error}" if o.error else "")))
    bad = [o for o in outcomes if o.exit_code]
    if bad:
        fail(f"{len(bad)} of {len(outcomes)} retried key(s) still {bad[0].status}", EXIT_FAILED)


def _print_outcome(outcome: RunOutcome, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(outcome.as_dict(), default=str))
    else:
        counts = ", ".join(f"{k}={v}" for k, v in outcome.counts.items())
        why = f" ({outcome.error})" if outcome.status == "skipped" and outcome.error else ""
        click.echo(escape_controls(
            f"{outcome.job} {outcome.status}{why} [{outcome.shard}] "
            f"{outcome.logical_time.isoformat()} attempt {outcome.attempt}"
            + (f": {counts}" if counts else "")))
    if outcome.exit_code:
        fail(f"{outcome.job} {outcome.status}: {outcome.error or 'see logs'}", EXIT_FAILED)


@click.command("scheduler")
@click.option("--misfire-grace", type=click.IntRange(1), default=300, show_default=True,
              help="Seconds a fire may run late before it is skipped (and caught up later).")
def scheduler_cmd(misfire_grace: int) -> None:
    """Run every registered job on its schedule, locally, until SIGTERM or Ctrl-C.

    The same registry as EventBridge Scheduler (cron expressions and time zones);
    coalesced, one instance per job at a time. On start, fire times missed since
    each job's last success are caught up (bounded: the last 48 hourly runs, 3
    monthly ones). Every fire goes through the run ledger like `hostmeter run`.
    Every 15 minutes (and on start) a retry pass runs again the keys whose run
    failed or was killed, like `hostmeter retry-failed`.
    """
    from jobs.triggers.runner import RunRequest, execute, last_success
    from jobs.triggers.scheduler import LocalScheduler

    engine = current_state().engine()
    settings = current_state().settings

    def fire(job: str, scheduled_time: datetime, trigger: str) -> RunOutcome:
        return execute(engine, settings, RunRequest(job=job, scheduled_time=scheduled_time,
                                                    trigger=trigger))

    def retry() -> object:  # killed or failed runs: at most 5 attempts per key, as on AWS
        from jobs.cli.retry import DEFAULT_MAX_ATTEMPTS
        from jobs.triggers.runner import retry_failed

        return retry_failed(engine, settings, max_attempts=DEFAULT_MAX_ATTEMPTS)

    scheduler = LocalScheduler(
        registry.JOBS, fire=fire, last_success=lambda job: last_success(engine, job),
        misfire_grace_time=misfire_grace, retry=retry)
    jobs = ", ".join(f"{j.name} {j.schedule} {j.timezone}" for j in registry.JOBS.values())
    click.echo(f"hostmeter scheduler: {jobs}; Ctrl-C or SIGTERM to stop", err=True)
    sys.exit(scheduler.run_forever())


@click.command("runs")
@click.option("--job", help="Only this job.")
@click.option("--status", type=click.Choice(list(RUN_STATUSES)), help="Only this status.")
@click.option("--overdue", is_flag=True,
              help="Only runs still running past their deadline (start + the job's bound).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def runs_cmd(job: str | None, status: str | None, overdue: bool, limit: int, fmt: str) -> None:
    """The run ledger, newest first: one row per attempt of a job for a key."""
    from jobs.cli.console import print_table
    from jobs.triggers.runner import list_runs

    if job is not None:
        registry.get(job)
    rows = list_runs(current_state().engine(), job=job, status=status, limit=limit,
                     overdue_at=datetime.now(UTC) if overdue else None)
    if fmt == "json":
        click.echo(json.dumps(rows, default=str))
        return
    print_table("runs", ["started", "job", "logical time", "shard", "trigger", "attempt",
                         "status", "duration", "error"],
                [[r["started_at"][:19], r["job"], r["logical_time"], r["shard"], r["trigger"],
                  r["attempt"], r["status"], _duration(r), (r["error"] or "")[:60]]
                 for r in rows], right=["attempt", "duration"])


def _duration(row: dict[str, Any]) -> str:
    if not row["finished_at"]:
        return ""
    seconds = (datetime.fromisoformat(row["finished_at"])
               - datetime.fromisoformat(row["started_at"])).total_seconds()
    return f"{seconds:.1f}s"


@click.command()
@click.argument("job")
@click.option("--from", "start", required=True, metavar="ISO8601", help="First hour (inclusive).")
@click.option("--to", "end", required=True, metavar="ISO8601", help="End (exclusive).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def backfill(job: str, start: str, end: str, fmt: str) -> None:
    """Run JOB for every hour in [--from, --to) (snapshot-usage)."""
    from jobs.cli.console import progress
    from jobs.snapshot_usage import backfill_hours
    from jobs.triggers.runner import RunRequest, execute

    spec = registry.get(job)
    if spec.name != "snapshot-usage":
        fail(f"job {quote_name(job)} has no hourly backfill (only snapshot-usage)",
             EXIT_BAD_INPUT)
    a, b = parse_at(start, "--from"), parse_at(end, "--to")
    for value, name in ((a, "--from"), (b, "--to")):
        if value != floor_hour(value):
            fail(f"{name} {value.isoformat()} is not on the hour: backfill snapshots whole "
                 "hours [--from, --to)", EXIT_BAD_INPUT)
    if b <= a:
        fail(f"--to {quote_name(end)} must be after --from {quote_name(start)}",
             EXIT_BAD_INPUT)
    hours = backfill_hours(a, b)
    engine = current_state().engine()
    with progress("snapshot-usage", len(hours)) as update:
        outcome = execute(engine, current_state().settings, RunRequest(
            job=spec.name, scheduled_time=a, trigger="backfill", options={"hours": hours}),
            progress=update)
    _print_outcome(outcome, fmt)
