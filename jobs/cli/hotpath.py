"""``hostmeter hotpath``: the post-time hot path in Redis, for the people who run it.

``script`` prints the shipped Lua protocol (what an API server in any language loads with
``SCRIPT LOAD`` and calls with ``EVALSHA``), ``status`` shows what Redis holds that the
database has not been told of yet (tenant-hours per UTC hour, posts, memory).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from jobs.cli.console import print_line, print_table
from jobs.cli.errors import EXIT_BAD_INPUT, CliError, Group
from jobs.cli.state import current_state

__all__ = ["hotpath_group"]

_SCRIPTS = ("record", "read_hour", "release_hour")


@click.group("hotpath", cls=Group)
def hotpath_group() -> None:
    """The post-time hot path in Redis (HOSTMETER_REDIS_URL).

    \b
    API servers record each metric post with one EVALSHA of record.lua;
    `hostmeter run flush-usage` (every 5 minutes) moves the hours into the
    database. README "Recording at post time" has the protocol.
    """


@hotpath_group.command("script")
@click.argument("name", type=click.Choice(_SCRIPTS), default="record")
@click.option("--sha", is_flag=True, help="Print only the SHA-1 that EVALSHA calls it by.")
@click.option("--path", "show_path", is_flag=True,
              help="Print only where the file is installed.")
def script_cmd(name: str, sha: bool, show_path: bool) -> None:
    """Print a shipped Lua script (default: record, the post protocol).

    \b
    Load it into Redis from a shell:
      redis-cli SCRIPT LOAD "$(hostmeter hotpath script)"
    """
    from metering.hotpath import LUA_DIR, script, script_sha

    if sha:
        click.echo(script_sha(name))
    elif show_path:
        click.echo(str(LUA_DIR / f"{name}.lua"))
    else:
        click.echo(script(name), nl=False)


@hotpath_group.command("status")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def status_cmd(fmt: str) -> None:
    """What Redis holds: tenant-hours and posts per UTC hour, and its memory."""
    from metering.flush import FLUSH_TIMEOUT, held_hours
    from metering.hotpath import HotPathUnavailable, connect_settings, redis_down, tenant_key

    settings = current_state().settings
    client = connect_settings(settings, timeout=FLUSH_TIMEOUT)
    if client is None:
        raise CliError("HOSTMETER_REDIS_URL is not set: there is no hot path to show",
                       EXIT_BAD_INPUT)

    try:
        held = held_hours(client)
        pairs = sorted((t, h) for t, hs in held.items() for h in hs)
        posts: dict[int, int] = {}
        tenants: dict[int, int] = {}
        with client.pipeline(transaction=False) as pipe:
            for tenant, hour in pairs:
                pipe.get(tenant_key(tenant, f"posts:{hour}"))
            values = pipe.execute() if pairs else []
        for (_, hour), value in zip(pairs, values, strict=True):
            posts[hour] = posts.get(hour, 0) + int(value or 0)
            tenants[hour] = tenants.get(hour, 0) + 1
        nodes = client.get_primaries() if hasattr(client, "get_primaries") else [None]
        used = 0
        for node in nodes:
            conn = client if node is None else client.get_redis_connection(node)
            used += int(conn.info("memory")["used_memory"])
    except redis_down() as exc:
        raise HotPathUnavailable(f"Redis did not answer: {exc}") from None
    finally:
        client.close()
    hours = [
        {"hour": datetime.fromtimestamp(h * 3600, UTC).isoformat().replace("+00:00", "Z"),
         "tenants": tenants[h], "posts": posts[h]}
        for h in sorted(tenants)
    ]
    if fmt == "json":
        click.echo(json.dumps({"hours": hours, "tenants": len(held),
                               "used_memory_bytes": used}))
        return
    if not hours:
        print_line(f"Redis holds no hours (used memory {used:,} bytes)")
        return
    print_table("held in Redis (not yet released by flush-usage)",
                ["hour (UTC)", "tenants", "posts"],
                [[h["hour"], f"{h['tenants']:,}", f"{h['posts']:,}"] for h in hours],
                right=["tenants", "posts"])
    print_line(f"{len(held):,} tenant(s); Redis used memory {used:,} bytes")
