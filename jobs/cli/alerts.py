"""``hostmeter alerts``: per-tenant budget thresholds on the projected month."""

from __future__ import annotations

import click

from jobs.cli.errors import Group

__all__ = ["alerts_group"]


@click.group("alerts", cls=Group)
def alerts_group() -> None:
    """Budget alerts: a threshold per tenant on the projected amount or units; crossing it
    raises one usage.threshold event (delivered by webhook)."""
