"""Exit codes and one-line errors of the ``hostmeter`` command line.

Exit codes: ``0`` done, ``1`` the work failed or was partial (or the database is unreachable),
``2`` bad usage or bad input. Errors are one line on stderr. Our packages' errors are
translated here, once: bad input (a bad window, record, trigger, tenant, catalog or setting,
a malformed database URL) → exit 2; anything else of ours → exit 1. A SQLAlchemy or driver
error (the database went away mid-run, refused a statement) is the database failing, not a
bug: it becomes a one-line :class:`~metering.errors.DatabaseError` (exit 1) naming the
database, password hidden, and the driver's reason, never the SQL or its parameters. Any other
foreign exception is not ours to hide.

Every one-line error is shown with its control characters escaped and cut to a bounded
length (:func:`metering.display.one_line`): a name in it can neither drive the terminal nor
flood it.
"""

from __future__ import annotations

from typing import Any, NoReturn

import click
import sqlalchemy as sa

from billing.errors import (
    BillingError,
    CatalogError,
    InvalidThreshold,
    ReasonRequired,
    UnknownTenant,
    WebhookRefused,
)
from jobs.runtime.errors import BadTrigger, JobError, UnknownJob
from metering.db import database_error
from metering.display import one_line
from metering.errors import (
    ConfigError,
    HotPathRejected,
    InvalidBatch,
    InvalidRecord,
    InvalidWindow,
    MeteringError,
)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "CliError",
    "Group",
    "fail",
    "raise_known",
    "translate",
]

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class _Failed(click.ClickException):
    """The work failed: one line on stderr, exit code 1."""

    exit_code = EXIT_FAILED

    def show(self, file: Any = None) -> None:
        click.echo(f"hostmeter: error: {one_line(self.format_message())}", err=True)


class _BadInput(_Failed):
    """Bad usage or input: one line on stderr, exit code 2."""

    exit_code = EXIT_BAD_INPUT


def CliError(message: str, exit_code: int) -> click.ClickException:
    """A one-line error that exits with ``exit_code``."""
    return _BadInput(message) if exit_code == EXIT_BAD_INPUT else _Failed(message)


def fail(message: str, exit_code: int = EXIT_FAILED) -> NoReturn:
    raise CliError(message, exit_code)


def translate(exc: Exception) -> click.ClickException:
    if isinstance(exc, InvalidWindow | InvalidRecord | InvalidBatch | ConfigError | UnknownJob
                  | BadTrigger | ReasonRequired | UnknownTenant | CatalogError
                  | HotPathRejected | InvalidThreshold | WebhookRefused):
        return CliError(str(exc), EXIT_BAD_INPUT)
    if isinstance(exc, MeteringError | JobError | BillingError):
        return CliError(str(exc), EXIT_FAILED)
    raise exc


def raise_known(exc: BaseException | None) -> None:
    """Re-raise a job's failure as its one-line CLI error when it is one of ours (bad input →
    exit 2, anything else of ours → exit 1) or the database's (exit 1); do nothing for ``None``
    or another foreign error."""
    if isinstance(exc, MeteringError | JobError | BillingError):
        raise translate(exc)
    if isinstance(exc, sa.exc.SQLAlchemyError):
        ctx = click.get_current_context(silent=True)
        raise translate(database_error(exc, _database_url(ctx) if ctx else None))


def _database_url(ctx: click.Context) -> str | None:
    settings = getattr(ctx.find_root().obj, "settings", None)
    return getattr(settings, "database_url", None)


class Group(click.Group):
    """A click group whose commands' errors of ours, and the database's, become one-line CLI
    errors."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (MeteringError, JobError, BillingError) as exc:
            raise translate(exc) from exc
        except sa.exc.SQLAlchemyError as exc:
            raise translate(database_error(exc, _database_url(ctx))) from exc
