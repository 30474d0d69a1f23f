"""``hostmeter usage``: month-to-date usage estimates (``usage estimate``)."""

from __future__ import annotations

import click

from jobs.cli.errors import Group

__all__ = ["usage_group"]


@click.group("usage", cls=Group)
def usage_group() -> None:
    """Month-to-date usage: what each tenant would pay if the month ended now, and the
    projection to the month's end."""
