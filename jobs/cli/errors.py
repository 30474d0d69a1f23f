"""Exit codes and one-line errors of the ``hostmeter`` command line.

Exit codes: ``0`` done, ``1`` the work failed or was partial (or the database is unreachable),
``2`` bad usage or bad input. Errors are one line on stderr. Our packages' errors are
translated here, once: bad input (a bad window, record, trigger, tenant, catalog or setting)
→ exit 2; anything else of ours → exit 1; a foreign exception is not ours to hide.
"""

from __future__ import annotations

from typing import Any, NoReturn

import click

from billing.errors import BillingError, CatalogError, ReasonRequired, UnknownTenant
from jobs.runtime.errors import BadTrigger, JobError, UnknownJob
from metering.errors import (
    ConfigError,
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
        click.echo(f"hostmeter: error: {self.format_message()}", err=True)


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
                  | BadTrigger | ReasonRequired | UnknownTenant | CatalogError):
        return CliError(str(exc), EXIT_BAD_INPUT)
    if isinstance(exc, MeteringError | JobError | BillingError):
        return CliError(str(exc), EXIT_FAILED)
    raise exc


def raise_known(exc: BaseException | None) -> None:
    """Re-raise a job's failure as its one-line CLI error when it is one of ours (bad input →
    exit 2, anything else of ours → exit 1); do nothing for ``None`` or a foreign error."""
    if isinstance(exc, MeteringError | JobError | BillingError):
        raise translate(exc)


class Group(click.Group):
    """A click group whose commands' errors of ours become one-line CLI errors."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (MeteringError, JobError, BillingError) as exc:
            raise translate(exc) from exc
