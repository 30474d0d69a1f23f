"""``hostmeter retry-failed``: run again every key whose run failed, ended partial or was killed
mid-way, for every job (what EventBridge Scheduler runs every 15 minutes on AWS; the local
scheduler has its own retry pass)."""

from __future__ import annotations

import json

import click

from jobs import registry
from jobs.cli.errors import EXIT_FAILED, fail
from jobs.cli.state import current_state
from jobs.runtime.locks import DEFAULT_WAIT_S

__all__ = ["retry_failed_cmd"]

DEFAULT_MAX_ATTEMPTS = 5


@click.command("retry-failed")
@click.option("--job", "jobs", multiple=True, metavar="JOB",
              help="Only this job (repeatable). Default: every registered job.")
@click.option("--max-attempts", type=click.IntRange(1), default=DEFAULT_MAX_ATTEMPTS,
              show_default=True,
              help="Leave a key alone once it has been attempted this many times (it stays "
                   "failed in the ledger, and alerts): a key that fails for good is not retried "
                   "forever. `hostmeter run JOB --retry-failed` has no such bound.")
@click.option("--wait", "wait_s", type=click.FloatRange(0), default=DEFAULT_WAIT_S,
              show_default=True, help="Seconds to wait for a run of the same key to finish.")
@click.option("--catch-up/--no-catch-up", default=True, show_default=True,
              help="Also run the fire times since each job's last success that left no run in "
                   "the ledger (a trigger never delivered, a task killed while starting).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def retry_failed_cmd(jobs: tuple[str, ...], max_attempts: int, wait_s: float, catch_up: bool,
                     fmt: str) -> None:
    """Run again every failed, partial or abandoned key of every job.

    A run whose process died (SIGKILL, OOM, a stopped ECS task) is still `running` in
    the ledger; its key's lock is free, so it is marked failed ("abandoned") here and
    run again. A live run holds its lock and is never touched. Then, unless
    --no-catch-up, the fire times since each job's last success that left no trace
    at all are run (jobs whose window no later run covers: snapshot-usage, the
    monthly close and finalize). Exit 1 when a retried key fails again.
    """
    from jobs.triggers.runner import retry_failed

    names = [registry.get(j).name for j in jobs] or None
    state = current_state()
    outcomes = retry_failed(state.engine(), state.settings, jobs=names,
                            max_attempts=max_attempts, wait_s=wait_s, catch_up=catch_up)
    if fmt == "json":
        click.echo(json.dumps([o.as_dict() for o in outcomes], default=str))
    elif not outcomes:
        click.echo("retry-failed: nothing to retry")
    else:
        for o in outcomes:
            click.echo(f"{o.job} {o.status} ({o.trigger}) [{o.shard}] "
                       f"{o.logical_time.isoformat()} attempt {o.attempt}"
                       + (f": {o.error}" if o.error else ""))
    bad = [o for o in outcomes if o.exit_code]
    if bad:
        fail(f"{len(bad)} of {len(outcomes)} retried key(s) still failing "
             f"({bad[0].job} {bad[0].status}: {bad[0].error or 'see logs'})", EXIT_FAILED)
