"""The ``hostmeter`` command line.

Exit codes: ``0`` done, ``1`` the work failed or was partial (or the database is unreachable),
``2`` bad usage or bad input. Errors are one line on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, BinaryIO

import click

from jobs import registry, snapshot_usage
from jobs._logging import configure_logging
from jobs.bench import bench_command
from jobs.billing_cli import billing_group, print_invoices
from jobs.clikit import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    CliError,
    Group,
    State,
    current_state,
    fail,
    parse_at,
    raise_known,
    translate,
)
from jobs.console import out, print_table, progress
from jobs.metrics_cli import dashboard_command, metrics_group
from jobs.models import RUN_STATUSES
from jobs.runner import (
    DEFAULT_WAIT_S,
    RunOutcome,
    RunRequest,
    Shard,
    execute,
    failed_keys,
    last_success,
    list_runs,
    parse_shard,
)
from jobs.runtime import JobContext, JobResult, run_job
from metering import db
from metering.errors import ConfigError, InvalidBatch, MeteringError
from metering.ingest import IngestSummary, ingest_lines
from metering.settings import Settings
from metering.timeutil import floor_hour, month_bounds, previous_period

__all__ = ["cli", "main"]



@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    envvar="HOSTMETER_DATABASE_URL",
    default=None,
    metavar="URL",
    help="Database (default sqlite:///hostmeter.db; env HOSTMETER_DATABASE_URL). "
    "Production: postgresql+psycopg://user@host/db.",
)
@click.version_option(package_name="hostmeter")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None) -> None:
    """hostmeter: usage metering and billing for host-based monitoring SaaS.

    Usage is recorded as metrics are posted (ingest), snapshotted every hour
    (snapshot-usage) and averaged over each month into billable host units.
    Start with `hostmeter demo`.
    """
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from exc
    if database_url:
        settings = dataclasses.replace(settings, database_url=database_url)
    ctx.obj = State(settings=settings)
    configure_logging(settings.log_dir, stderr_level="warning" if sys.stderr.isatty() else "info")


# --- db ------------------------------------------------------------------------------------


@cli.group(cls=Group)
def db_group() -> None:
    """Database schema (Alembic migrations)."""


cli.add_command(db_group, name="db")


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (alembic upgrade head)."""
    state = current_state()
    engine = state.engine(schema=False)
    db.check_connection(engine)
    before = db.current_revision(engine)
    db.upgrade(engine, revision)
    after = db.current_revision(engine)
    url = db.redact_url(state.settings.database_url)
    if before == after:
        out.print(f"{url}: schema already at {after}")
    else:
        out.print(f"{url}: schema upgraded {before or 'empty'} → {after}")


@db_group.command("current")
def db_current() -> None:
    """Show the schema revision of the database and the one this hostmeter needs."""
    state = current_state()
    engine = state.engine(schema=False)
    db.check_connection(engine)
    current, head = db.current_revision(engine), db.head_revision()
    status = "up to date" if current == head else "run `hostmeter db upgrade`"
    out.print(f"database: {current or 'empty'}  code: {head}  ({status})")


# --- ingest --------------------------------------------------------------------------------


def _binary_lines(stream: BinaryIO, update: Any, size: int | None) -> Iterator[bytes]:
    done = 0
    for i, raw in enumerate(stream, start=1):
        done += len(raw)
        if size and i % 2000 == 0:
            update(done, size)
        yield raw
    if size:
        update(size, size)


@cli.command()
@click.argument("source", metavar="FILE|-")
@click.option("--skip-invalid", is_flag=True,
              help="Load the good lines and report the bad ones (default: reject the whole file).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def ingest(source: str, skip_invalid: bool, fmt: str) -> None:
    """Record usage from JSON Lines (schema v1); FILE or - for stdin.

    \b
    Record types (one JSON object per line):
      {"type":"plan","tenant":"acme","plan":"standard","at":"2026-10-15T00:00:00+09:00"}
      {"type":"host_post","tenant":"acme","host":"h-1","kind":"standard",
       "at":"2026-10-15T10:03:00Z","metrics":["loadavg5","cpu.user"]}
      {"type":"service_post","tenant":"acme","service":"web","at":"…","metrics":["req.count"]}
      {"type":"monitor","tenant":"acme","monitor":"m-1","at":"…","state":"created|deleted"}
      {"type":"anomaly_role","tenant":"acme","role":"web:app","at":"…","enabled":true}
      {"type":"role_member","tenant":"acme","role":"web:app","host":"h-1","at":"…","member":true}

    Loading the same records again changes nothing. By default one bad line
    rejects the whole input and nothing is written.
    """
    if source == "-":
        stream: BinaryIO = sys.stdin.buffer
        size = None
    else:
        path = Path(source)
        if not path.is_file():  # bad input is reported before the database is touched
            fail(f"{source}: no such file", EXIT_BAD_INPUT)
        stream = path.open("rb")
        size = path.stat().st_size
    try:
        engine = current_state().engine()
        with progress(f"ingest {source}", size) as update:
            summary = ingest_lines(
                engine, _binary_lines(stream, update, size), skip_invalid=skip_invalid
            )
    except InvalidBatch as exc:
        # click.echo, not the rich console: a record's error stays on one line at any width.
        if exc.count > 1:
            for e in exc.errors[:5]:
                click.echo(f"  {e}", err=True)
            if exc.count > 5:
                click.echo(f"  … and {exc.count - 5} more", err=True)
        fail(f"{source}: {exc.errors[0]}; {exc}", EXIT_BAD_INPUT)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    _print_ingest(summary, fmt)


def _print_ingest(summary: IngestSummary, fmt: str) -> None:
    data = summary.as_dict()
    if fmt == "json":
        data["errors"] = [
            {"line": e.line, "field": e.field, "message": e.message} for e in summary.errors
        ]
        click.echo(json.dumps(data))
        return
    print_table("ingest", ["records", "tenants", "hosts", "hours", "rows written", "rejected"],
                [[data["records"], data["tenants"], data["hosts"], data["hours"],
                  data["rows_written"], data["rejected"]]],
                right=["records", "tenants", "hosts", "hours", "rows written", "rejected"])
    if summary.rejected:
        click.echo(f"skipped {summary.rejected} invalid line(s); the first ones:", err=True)
        for e in summary.errors[:5]:
            click.echo(f"  {e}", err=True)


# --- run / backfill ------------------------------------------------------------------------


def _finish(result: JobResult, fmt: str = "table") -> None:
    if fmt == "json":
        click.echo(json.dumps({
            "job": result.job, "run_id": result.run_id,
            "logical_time": result.logical_time.isoformat(), "status": result.status,
            "duration_s": result.duration_s, "counts": result.counts, "error": result.error,
        }, default=str))
    else:
        counts = ", ".join(f"{k}={v}" for k, v in result.counts.items())
        click.echo(f"{result.job} {result.status} in {result.duration_s:.2f}s: {counts}")
    if not result.ok:
        fail(f"{result.job} {result.status}: {result.error or 'see logs'}", EXIT_FAILED)


@cli.command("run")
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
@click.option("--lookback", type=click.IntRange(0, 48), default=snapshot_usage.DEFAULT_LOOKBACK,
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
            click.echo(f"{o.job} {o.status} [{o.shard}] {o.logical_time.isoformat()} "
                       f"attempt {o.attempt}" + (f": {o.error}" if o.error else ""))
    bad = [o for o in outcomes if o.exit_code]
    if bad:
        fail(f"{len(bad)} of {len(outcomes)} retried key(s) still {bad[0].status}", EXIT_FAILED)


def _print_outcome(outcome: RunOutcome, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(outcome.as_dict(), default=str))
    else:
        counts = ", ".join(f"{k}={v}" for k, v in outcome.counts.items())
        why = f" ({outcome.error})" if outcome.status == "skipped" and outcome.error else ""
        click.echo(f"{outcome.job} {outcome.status}{why} [{outcome.shard}] "
                   f"{outcome.logical_time.isoformat()} attempt {outcome.attempt}"
                   + (f": {counts}" if counts else ""))
    if outcome.exit_code:
        fail(f"{outcome.job} {outcome.status}: {outcome.error or 'see logs'}", EXIT_FAILED)


@cli.command("scheduler")
@click.option("--misfire-grace", type=click.IntRange(1), default=300, show_default=True,
              help="Seconds a fire may run late before it is skipped (and caught up later).")
def scheduler_cmd(misfire_grace: int) -> None:
    """Run every registered job on its schedule, locally, until SIGTERM or Ctrl-C.

    The same registry as EventBridge Scheduler (cron expressions and time zones);
    coalesced, one instance per job at a time. On start, fire times missed since
    each job's last success are caught up (bounded: the last 48 hourly runs, 3
    monthly ones). Every fire goes through the run ledger like `hostmeter run`.
    """
    from jobs.scheduler import LocalScheduler

    engine = current_state().engine()
    settings = current_state().settings

    def fire(job: str, scheduled_time: datetime, trigger: str) -> RunOutcome:
        return execute(engine, settings, RunRequest(job=job, scheduled_time=scheduled_time,
                                                    trigger=trigger))

    scheduler = LocalScheduler(
        registry.JOBS, fire=fire, last_success=lambda job: last_success(engine, job),
        misfire_grace_time=misfire_grace)
    jobs = ", ".join(f"{j.name} {j.schedule} {j.timezone}" for j in registry.JOBS.values())
    click.echo(f"hostmeter scheduler: {jobs}; Ctrl-C or SIGTERM to stop", err=True)
    sys.exit(scheduler.run_forever())


@cli.command("runs")
@click.option("--job", help="Only this job.")
@click.option("--status", type=click.Choice(list(RUN_STATUSES)), help="Only this status.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def runs_cmd(job: str | None, status: str | None, limit: int, fmt: str) -> None:
    """The run ledger, newest first: one row per attempt of a job for a key."""
    if job is not None:
        registry.get(job)
    rows = list_runs(current_state().engine(), job=job, status=status, limit=limit)
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


@cli.command()
@click.argument("job")
@click.option("--from", "start", required=True, metavar="ISO8601", help="First hour (inclusive).")
@click.option("--to", "end", required=True, metavar="ISO8601", help="End (exclusive).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def backfill(job: str, start: str, end: str, fmt: str) -> None:
    """Run JOB for every hour in [--from, --to) (snapshot-usage)."""
    spec = registry.get(job)
    if spec.name != "snapshot-usage":
        fail(f"job {job!r} has no hourly backfill (only snapshot-usage)", EXIT_BAD_INPUT)
    a, b = parse_at(start, "--from"), parse_at(end, "--to")
    for value, name in ((a, "--from"), (b, "--to")):
        if value != floor_hour(value):
            fail(f"{name} {value.isoformat()} is not on the hour: backfill snapshots whole "
                 "hours [--from, --to)", EXIT_BAD_INPUT)
    if b <= a:
        fail(f"--to {end} must be after --from {start}", EXIT_BAD_INPUT)
    hours = snapshot_usage.backfill_hours(a, b)
    engine = current_state().engine()
    with progress("snapshot-usage", len(hours)) as update:
        outcome = execute(engine, current_state().settings, RunRequest(
            job=spec.name, scheduled_time=a, trigger="backfill", options={"hours": hours}),
            progress=update)
    _print_outcome(outcome, fmt)


# --- demo ----------------------------------------------------------------------------------


def _avg(total: int, hours: int) -> str:
    """An hour sum's monthly average, for display only (billing keeps the exact fraction)."""
    return str((Decimal(total) / Decimal(hours)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


@cli.command()
@click.option("--seed", type=int, default=1, show_default=True, help="Another seed, another fleet.")
@click.option("--period", metavar="YYYY-MM",
              help="Month to generate (default: the previous full month in the billing zone).")
@click.option("--tenants", type=click.IntRange(12, 5000), default=36, show_default=True)
def demo(seed: int, period: str | None, tenants: int) -> None:
    """Generate a synthetic fleet, snapshot a month of hours, close it, print invoices."""
    from jobs.demo import run_demo

    state = current_state()
    settings = state.settings
    period = period or previous_period(datetime.now(UTC), settings.zone)
    month_bounds(period, settings.zone)  # validates the period before touching the database
    engine = state.engine()
    out.print(f"hostmeter demo: {tenants} tenants, period {period} ({settings.billing_tz}), "
              f"database {db.redact_url(settings.database_url)}", markup=False)
    with (
        progress("record usage", tenants) as ingest_update,
        progress("snapshot hours", None) as snap_update,
    ):
        ctx = JobContext(engine=engine, settings=settings, trigger="manual",
                         progress=snap_update)
        result = run_demo(ctx, period, seed=seed, tenants=tenants, ingest_progress=ingest_update)
    n = result.hours_in_month
    shapes = {t.key: t.shape for t in result.fleet}
    rows = []
    for u in result.usage:
        rows.append([
            u.tenant, shapes.get(u.tenant, ""), u.main_plan, u.standard_hours,
            _avg(u.standard_host_hours, n), _avg(u.micro_host_hours, n),
            _avg(u.standard_overage, n), _avg(u.micro_overage, n),
            _avg(u.service_metrics, n), _avg(u.monitors, n),
        ])
    print_table(
        f"usage {period}: averages over all {n} hours of the month",
        ["tenant", "shape", "plan", "paid h", "std hosts", "micro hosts", "std overage",
         "micro overage", "svc metrics", "monitors"],
        rows,
        right=["paid h", "std hosts", "micro hosts", "std overage", "micro overage",
               "svc metrics", "monitors"],
    )
    s = result.ingest
    out.print(
        f"recorded {s.records} records ({s.written_rows} rows written) for {len(s.tenants)} "
        f"tenants, {len(s.hosts)} hosts; snapshotted {result.snapshot.counts.get('hours', 0)} "
        f"hours in {result.snapshot.duration_s:.1f}s; coverage {result.covered_hours}/{n} hours",
        markup=False,
    )
    if not result.snapshot.ok:
        fail(f"snapshot-usage {result.snapshot.status}: {result.snapshot.error}")
    print_invoices(period, result.invoices)
    if result.billing is not None:
        c = result.billing.counts()
        out.print(
            f"close-billing-period {result.close.status}: {c['invoices_written']} invoice(s) "
            f"written, {c['unchanged']} unchanged; see `hostmeter billing show --period "
            f"{period} --format json` for every line and its basis", markup=False)
        for tenant, hosts in result.billing.free_over_limit:
            out.print(f"free plan over its host limit (reported, not invoiced): {tenant} "
                      f"(up to {hosts} hosts)", markup=False)
    if not result.close.ok:
        fail(f"close-billing-period {result.close.status}: {result.close.error}")


cli.add_command(bench_command)
cli.add_command(billing_group)
cli.add_command(metrics_group)
cli.add_command(dashboard_command)


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(prog_name="hostmeter")
    except MeteringError as exc:  # raised outside a command (e.g. settings)
        click.echo(f"hostmeter: error: {exc}", err=True)
        sys.exit(translate(exc).exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
