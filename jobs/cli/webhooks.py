"""``hostmeter webhooks``: endpoints, deliveries, redelivery.

- ``add --url URL (--tenant T | --global) (--secret-file PATH|- | --secret-env VAR)``: the
  secret never comes from the command line (another user can read a process's arguments); it
  is stored once and never printed or logged: ``endpoints`` shows only that one is set.
- ``endpoints``: every endpoint, removed ones too. ``remove ID``: disable one; its pending
  deliveries become ``dead`` ("endpoint removed").
- ``list [--failed | --status S] [--tenant T] [--limit N]``: deliveries, newest first.
  ``--failed`` is the ``dead`` ones only; pending deliveries that are still being retried show
  in the plain list (and ``--status pending``) with their last error.
- ``redeliver ID... | --all-failed [--tenant T]``: queue again, due now, same event id and body.

The database work is :mod:`billing.webhooks`; the sending, ``hostmeter run deliver-webhooks``.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

import click

from jobs.cli.console import print_line, print_table
from jobs.cli.errors import EXIT_BAD_INPUT, Group, fail
from jobs.cli.state import current_state
from metering.display import quote_name

__all__ = ["webhooks_group"]


@click.group("webhooks", cls=Group)
def webhooks_group() -> None:
    """Webhook endpoints and the deliveries of the outbox's events (signed, retried)."""


def _format_option() -> Any:
    return click.option("--format", "fmt", type=click.Choice(["table", "json"]),
                        default="table", show_default=True)


def _when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _read_secret(secret_file: str | None, secret_env: str | None) -> str:
    if (secret_file is None) == (secret_env is None):
        fail("give the secret with exactly one of --secret-file PATH (- for stdin) or "
             "--secret-env VAR (never on the command line)", EXIT_BAD_INPUT)
    if secret_env is not None:
        value = os.environ.get(secret_env)
        if value is None:
            fail(f"environment variable {quote_name(secret_env)} is not set", EXIT_BAD_INPUT)
        return value
    assert secret_file is not None
    if secret_file == "-":
        if sys.stdin.isatty():
            value = click.prompt("Signing secret", hide_input=True, err=True, default="",
                                 show_default=False)
            return str(value)
        return sys.stdin.read(64 * 1024)
    try:
        with open(secret_file, encoding="utf-8") as f:
            return f.read(64 * 1024)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        fail(f"cannot read the secret file {quote_name(secret_file)}: {reason}", EXIT_BAD_INPUT)


@webhooks_group.command("add")
@click.option("--url", required=True, help="https:// URL (http:// only to a loopback host).")
@click.option("--tenant", metavar="T", help="Send this tenant's events.")
@click.option("--global", "is_global", is_flag=True, help="Send every tenant's events.")
@click.option("--secret-file", metavar="PATH",
              help="File holding the signing secret (one line); - reads stdin.")
@click.option("--secret-env", metavar="VAR", help="Environment variable holding the secret.")
@_format_option()
def add_cmd(url: str, tenant: str | None, is_global: bool, secret_file: str | None,
            secret_env: str | None, fmt: str) -> None:
    """Add an endpoint. Events queued from now on are sent to it, signed with the secret.

    \b
    Generate a secret with, for example:
      python3 -c 'import secrets; print(secrets.token_hex(32))' > hook.secret
      hostmeter webhooks add --url https://example.com/hooks --tenant acme \\
          --secret-file hook.secret
    """
    from billing import webhooks as wh
    from jobs.runtime.context import actor

    if (tenant is None) == (not is_global):
        fail("give exactly one of --tenant T or --global", EXIT_BAD_INPUT)
    wh.check_url(url)  # bad input before reading a secret or touching the database
    secret = _read_secret(secret_file, secret_env)
    with current_state().engine().begin() as conn:
        endpoint = wh.add_endpoint(conn, url=url, secret=secret, tenant=tenant,
                                   now=datetime.now(UTC), created_by=actor())
    if fmt == "json":
        click.echo(json.dumps(_endpoint_json(endpoint), ensure_ascii=False))
        return
    whose = "every tenant" if endpoint.tenant is None else f"tenant {endpoint.tenant}"
    print_line(f"webhook endpoint {endpoint.id} added: {whose} → {endpoint.url} "
               "(secret stored; it is never shown)")


def _endpoint_json(e: Any) -> dict[str, Any]:
    return {"id": e.id, "tenant": e.tenant, "global": e.tenant is None, "url": e.url,
            "enabled": e.enabled, "secret": "set", "created_at": e.created_at.isoformat(),
            "created_by": e.created_by,
            "disabled_at": None if e.disabled_at is None else e.disabled_at.isoformat()}


@webhooks_group.command("endpoints")
@_format_option()
def endpoints_cmd(fmt: str) -> None:
    """List the endpoints (removed ones too). Secrets are never shown."""
    from billing import webhooks as wh
    from metering.db import reading

    with reading(current_state().engine()) as conn:
        endpoints = wh.list_endpoints(conn)
    if fmt == "json":
        click.echo(json.dumps([_endpoint_json(e) for e in endpoints], ensure_ascii=False))
        return
    if not endpoints:
        print_line("no webhook endpoints (add one: hostmeter webhooks add --help)")
        return
    print_table("webhook endpoints", ["id", "tenant", "url", "status", "secret", "created",
                                      "by"],
                [[e.id, "(every tenant)" if e.tenant is None else e.tenant, e.url,
                  "enabled" if e.enabled else f"removed {_when(e.disabled_at)}", "set",
                  _when(e.created_at), e.created_by] for e in endpoints], right=["id"])


@webhooks_group.command("remove")
@click.argument("endpoint_id", metavar="ID", type=int)
def remove_cmd(endpoint_id: int) -> None:
    """Disable endpoint ID: no new event goes to it, and its pending deliveries become dead
    ("endpoint removed"; see `webhooks list --failed`)."""
    from billing import webhooks as wh

    with current_state().engine().begin() as conn:
        endpoint, given_up = wh.remove_endpoint(conn, endpoint_id, now=datetime.now(UTC))
    print_line(f"webhook endpoint {endpoint.id} removed ({endpoint.url}); {given_up} pending "
               f"deliveries marked dead")


@webhooks_group.command("list")
@click.option("--failed", is_flag=True,
              help="Only dead deliveries (pending ones being retried are not included).")
@click.option("--status", type=click.Choice(["pending", "delivered", "dead"]),
              help="Only deliveries in this status.")
@click.option("--tenant", metavar="T", help="Only this tenant's deliveries.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@_format_option()
def list_cmd(failed: bool, status: str | None, tenant: str | None, limit: int,
             fmt: str) -> None:
    """The latest deliveries, newest first: status, attempts, last answer, next attempt.

    --failed shows the dead ones (retries exhausted, refused by the receiver, or their
    endpoint removed): redeliver them with `hostmeter webhooks redeliver`."""
    from billing import webhooks as wh
    from metering.db import reading

    if failed and status not in (None, "dead"):
        fail("--failed means --status dead; give one of them", EXIT_BAD_INPUT)
    with reading(current_state().engine()) as conn:
        rows = wh.list_deliveries(conn, status="dead" if failed else status, tenant=tenant,
                                  limit=limit)
    if fmt == "json":
        click.echo(json.dumps([r.as_dict() for r in rows], ensure_ascii=False))
        return
    if not rows:
        print_line("no failed webhook deliveries" if failed else "no webhook deliveries")
        return
    print_table("webhook deliveries" + (" (dead)" if failed else ""),
                ["id", "event", "type", "tenant", "endpoint", "status", "tries", "last",
                 "next attempt"],
                [[r.id, r.event_id, r.type, r.tenant, f"{r.endpoint_id} {_cut(r.url, 40)}",
                  r.status, r.attempts, _last(r), _when(r.next_attempt_at)] for r in rows],
                right=["id", "tries"])


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _last(r: Any) -> str:
    if r.last_error:
        return _cut(str(r.last_error), 36)
    if r.last_status is not None:
        return f"HTTP {r.last_status}"
    return ""


@webhooks_group.command("redeliver")
@click.argument("ids", metavar="[ID]...", nargs=-1, type=int)
@click.option("--all-failed", is_flag=True, help="Every dead delivery (of --tenant if given).")
@click.option("--tenant", metavar="T", help="With --all-failed: only this tenant's.")
def redeliver_cmd(ids: tuple[int, ...], all_failed: bool, tenant: str | None) -> None:
    """Send deliveries again: a dead or delivered one goes back to pending, due now, with a
    fresh retry window (a pending one is made due now). Same event id and body, so a receiver
    that has it already ignores it. The next `deliver-webhooks` run sends them, in event
    order per tenant and endpoint."""
    from billing import webhooks as wh

    if bool(ids) == all_failed:
        fail("give delivery IDs or --all-failed", EXIT_BAD_INPUT)
    if tenant is not None and not all_failed:
        fail("--tenant goes with --all-failed", EXIT_BAD_INPUT)
    with current_state().engine().begin() as conn:
        requeued = wh.redeliver(conn, ids, all_failed=all_failed, tenant=tenant,
                                now=datetime.now(UTC))
    import structlog

    log = structlog.get_logger("hostmeter.webhooks")
    for r in requeued:
        log.info("webhook_redelivery_queued", delivery=r.id, event_id=r.event_id,
                 endpoint=r.endpoint_id, was=r.was, attempts_before=r.attempts_before)
        print_line(f"delivery {r.id} ({r.event_id}) queued again (was {r.was}, "
                   f"{r.attempts_before} attempts)")
    if not requeued:
        print_line("nothing to redeliver")
