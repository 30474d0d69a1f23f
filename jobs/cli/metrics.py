"""``hostmeter metrics aggregate|serve`` and ``hostmeter dashboard``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import click

from jobs.cli.errors import EXIT_BAD_INPUT, EXIT_FAILED, Group, fail
from jobs.cli.state import current_state
from metering.display import escape_controls, quote_name

__all__ = ["dashboard_command", "metrics_group"]


@click.group("metrics", cls=Group)
def metrics_group() -> None:
    """Job metrics aggregated from the jobs' own JSON logs, and their exports."""


@metrics_group.command("aggregate")
@click.option("--logs", "logs", multiple=True, metavar="PATH",
              help="A log file or directory; repeatable. Default: HOSTMETER_LOG_DIR, unless "
                   "log groups are given.")
@click.option("--log-group", "log_groups", multiple=True, metavar="NAME",
              help="A CloudWatch Logs group to read (needs boto3: pip install "
                   "'hostmeter[aws]'); repeatable. Default: HOSTMETER_LOG_GROUPS "
                   "(comma-separated).")
@click.option("--export", "exports", multiple=True,
              type=click.Choice(["mackerel", "prometheus"]),
              help="Also export: mackerel (needs MACKEREL_API_KEY) or prometheus (textfile "
                   "HOSTMETER_PROMETHEUS_TEXTFILE, default <log dir>/hostmeter.prom).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def aggregate_cmd(logs: tuple[str, ...], log_groups: tuple[str, ...], exports: tuple[str, ...],
                  fmt: str) -> None:
    """Read new job-log lines (checkpointed: reading again adds nothing) into metrics.

    The lines come from JSON log files, or from CloudWatch Logs groups (where ECS and Lambda
    put the jobs' stderr on AWS), each read from its own checkpoint."""
    from jobs import aggregate_job_logs
    from jobs.runtime.context import JobContext, run_job

    for path in logs:
        if not Path(path).exists():
            fail(f"--logs {quote_name(path, limit=200)}: no such file or directory",
                 EXIT_BAD_INPUT)
    state = current_state()
    ctx = JobContext(engine=state.engine(), settings=state.settings)
    result = run_job("aggregate-job-logs", aggregate_job_logs.run, ctx, datetime.now(UTC),
                     logs=logs, log_groups=list(log_groups) or None, exports=list(exports))
    if fmt == "json":
        click.echo(json.dumps({"status": result.status, **result.counts,
                               "error": result.error}, default=str))
    else:
        click.echo(escape_controls(f"aggregate-job-logs {result.status}: "
                                   + ", ".join(f"{k}={v}" for k, v in result.counts.items())))
    if not result.ok:
        fail(f"aggregate-job-logs failed: {result.error}", EXIT_FAILED)


@metrics_group.command("serve")
@click.option("--port", type=click.IntRange(1, 65535), default=9464, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
def serve_cmd(port: int, host: str) -> None:
    """Serve the Prometheus exposition on http://HOST:PORT/metrics until Ctrl-C.

    Per tenant it shows the HOSTMETER_EXPORT_TOP_TENANTS (default 10) largest tenants of each
    series and the noisiest flagged ones, never every tenant."""
    from jobs.monitoring.exports import prometheus_registry, top_tenants_from_env
    from jobs.monitoring.prometheus import serve

    top = top_tenants_from_env()  # a bad value stops here, not at every scrape
    state = current_state()
    engine = state.engine()
    server = serve(port, lambda: prometheus_registry(engine, state.settings.zone, top=top),
                   host=host)
    click.echo(f"serving http://{host}:{port}/metrics; Ctrl-C to stop", err=True)
    _until_interrupted(server.shutdown)


def _until_interrupted(stop: Callable[[], object]) -> None:
    """Block until Ctrl-C, then ``stop`` the server (also on any other way out)."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


@click.command("dashboard")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("dashboard.html"), show_default=True, help="Write the page here.")
@click.option("--serve", "do_serve", is_flag=True, help="Serve it on localhost instead.")
@click.option("--port", type=click.IntRange(1, 65535), default=8050, show_default=True)
@click.option("--tenant", "tenants", multiple=True, metavar="ID",
              help="Draw this tenant's projected bill over the month (repeatable; default: "
              "the five largest).")
def dashboard_command(out_path: Path, do_serve: bool, port: int,
                      tenants: tuple[str, ...]) -> None:
    """One self-contained HTML page: job durations, runs by status, tenants expected vs
    processed, snapshot coverage, billed units and amounts, top tenants, failed runs, and
    this month's projected bill (the fleet's and each tenant's, hour by hour).

    Run `hostmeter metrics aggregate` first: the page shows the aggregated job logs.
    """
    from jobs.monitoring.dashboard import serve, write
    from jobs.monitoring.logmetrics import dashboard_data

    state = current_state()
    engine = state.engine()

    def build():  # type: ignore[no-untyped-def]
        return dashboard_data(engine, state.settings.zone, now=datetime.now(UTC),
                              tenants=tenants)

    if do_serve:
        if tenants:  # refuse an unknown tenant now, not at every page load
            from billing.repository import resolve_tenants
            from metering.db import reading

            with reading(engine) as conn:
                resolve_tenants(conn, tenants)
        server, bound = serve(port, build)
        click.echo(f"serving http://127.0.0.1:{bound}/ ; Ctrl-C to stop", err=True)
        _until_interrupted(server.stop)
        return
    write(out_path, build())
    click.echo(f"wrote {out_path}")
