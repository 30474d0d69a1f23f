"""The ``hostmeter`` command group: global options, the ``db`` commands, and every other
command, each from its own module.

Exit codes: ``0`` done, ``1`` the work failed or was partial (or the database is unreachable),
``2`` bad usage or bad input. Errors are one line on stderr.

Start-up cost: this module and the command modules import only click, SQLAlchemy and our own
light modules at the top; rich, httpx, prometheus-client, redis, APScheduler and boto3 are
imported inside the commands that use them, so ``hostmeter --help`` and a scheduled
``hostmeter run`` pay only for what they run.
"""

from __future__ import annotations

import dataclasses
import sys

import click

from jobs.cli.alerts import alerts_group
from jobs.cli.bench import bench_command
from jobs.cli.billing import billing_group
from jobs.cli.demo import demo
from jobs.cli.errors import EXIT_BAD_INPUT, CliError, Group, translate
from jobs.cli.hotpath import hotpath_group
from jobs.cli.ingest import ingest
from jobs.cli.metrics import dashboard_command, metrics_group
from jobs.cli.retry import retry_failed_cmd
from jobs.cli.runs import backfill, run_cmd, runs_cmd, scheduler_cmd
from jobs.cli.state import State, current_state
from jobs.cli.usage import usage_group
from jobs.cli.webhooks import webhooks_group
from metering import db
from metering.display import one_line
from metering.errors import ConfigError, MeteringError
from metering.settings import Settings

__all__ = ["cli", "main"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    envvar="HOSTMETER_DATABASE_URL",
    default=None,
    metavar="URL",
    help="Database (default sqlite:///hostmeter.db; env HOSTMETER_DATABASE_URL). "
    "Production: postgresql+psycopg://user:password@host/db (postgres:// means the same; "
    "percent-encode an @ in the password as %40).",
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
    from jobs.runtime.logconfig import configure_logging

    configure_logging(settings.log_dir, stderr_level="warning" if sys.stderr.isatty() else "info",
                      secrets=[*db.password_forms(settings.database_url),
                               *db.password_forms(settings.redis_url)])


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
        click.echo(f"{url}: schema already at {after}")
    else:
        click.echo(f"{url}: schema upgraded {before or 'empty'} → {after}")


@db_group.command("current")
def db_current() -> None:
    """Show the schema revision of the database and the one this hostmeter needs."""
    state = current_state()
    engine = state.engine(schema=False)
    db.check_connection(engine)
    current, head = db.current_revision(engine), db.head_revision()
    status = "up to date" if current == head else "run `hostmeter db upgrade`"
    click.echo(f"database: {current or 'empty'}  code: {head}  ({status})")
    if engine.dialect.name == "postgresql" and current is not None:
        from metering.grants import check_runtime_role

        role = check_runtime_role(engine)
        if role.sealed:
            click.echo(f"role: {role.role} (runtime role: cannot alter the tables or their "
                       "triggers)")
        else:
            why = "a superuser" if role.superuser else "the owner of the tables"
            click.echo(f"role: {role.role} is {why}: it could unseal final invoices; run the "
                       "jobs as a runtime role (`hostmeter db grant ROLE`, README \"Two "
                       "database roles\")")


@db_group.command("grant")
@click.argument("role")
def db_grant(role: str) -> None:
    """Grant ROLE what the jobs need on PostgreSQL, as the schema owner, after `db upgrade`.

    \b
    SELECT, INSERT, UPDATE, DELETE on every table (SELECT only on alembic_version)
    and the sequences, also for tables later migrations create. ROLE gets no
    ownership, TRUNCATE or TRIGGER privilege: it cannot disable the triggers that
    seal final invoices. Refuses a superuser, an unknown role and the owner.
    """
    from metering.grants import grant_runtime_role

    state = current_state()
    engine = state.engine()
    statements = grant_runtime_role(engine, role)
    click.echo(f"{db.redact_url(state.settings.database_url)}: granted {len(statements)} "
               f"privilege statement(s) to {role}")


for command in (ingest, run_cmd, backfill, retry_failed_cmd, runs_cmd, scheduler_cmd, demo,
                bench_command, billing_group, metrics_group, dashboard_command, hotpath_group,
                usage_group, alerts_group, webhooks_group):
    cli.add_command(command)

def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(prog_name="hostmeter")
    except MeteringError as exc:  # raised outside a command (e.g. settings)
        click.echo(f"hostmeter: error: {one_line(str(exc))}", err=True)
        sys.exit(translate(exc).exit_code)

