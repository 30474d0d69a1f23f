"""``hostmeter webhooks``: endpoints, deliveries, redelivery."""

from __future__ import annotations

import click

from jobs.cli.errors import Group

__all__ = ["webhooks_group"]


@click.group("webhooks", cls=Group)
def webhooks_group() -> None:
    """Webhook endpoints and the deliveries of the outbox's events (signed, retried)."""
