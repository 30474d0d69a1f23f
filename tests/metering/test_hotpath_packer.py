"""The hot path's client-side shortcuts give exactly what they replace: the command packer the
same bytes (or the same error) as redis-py's own, the metric check the same verdict as
``checked_metric`` name by name."""

from __future__ import annotations

from typing import Any

import pytest
from redis.connection import Connection
from redisservers import RedisServer

from metering.hotpath import _ArgumentPacker, _metrics_ok, connect
from metering.records import checked_metric

FAST = _ArgumentPacker.made()
pytestmark = pytest.mark.skipif(FAST is None, reason="hiredis is not installed")


def _outcome(packer: Any, args: tuple[Any, ...]) -> bytes | str:
    try:
        return b"".join(bytes(chunk) for chunk in packer.pack(*args))
    except Exception as exc:
        return type(exc).__name__


@pytest.mark.parametrize("args", [
    ("EVALSHA", "0" * 40, 3, "hm:{acme}:dict:host", "hm:{acme}:host:1", "hm:{acme}:posts:1",
     "h-1", "standard", "cpu.user", "é", "日本語"),
    ("SET", b"k", b"\x00\xff"), ("SET", "k", 1.5), ("SET", "k", 0.1), ("SET", "k", 10**30),
    ("SET", "k", -7), ("SET", "k", memoryview(b"abc")), ("SET", "k", bytearray(b"x")),
    ("SCRIPT LOAD", "return 1"), ("MEMORY USAGE", "k", "SAMPLES", 0),
    ("SET", "k", True), ("SET", "k", None), ("SET", "k", "\ud800"),
])
def test_packer_sends_what_redis_py_sends(args: tuple[Any, ...]) -> None:
    assert _outcome(FAST, args) == _outcome(Connection()._command_packer, args)


@pytest.mark.parametrize("names", [
    ["loadavg5", "cpu.user"], ["a", " "], ["a", "\t\n"], ["a\x00b"], ["x" * 500], ["x" * 501],
    ["é" * 250], ["é" * 251], ["a", 3], ["\x1c"], ["\ud800"], ["ok", "\ud800"], [""],
])
def test_metric_check_agrees_with_checked_metric(names: list[Any]) -> None:
    assert _metrics_ok(names) == all(checked_metric(n) for n in names)


def test_a_connected_client_uses_the_packer(redis_single: RedisServer) -> None:
    client = connect(redis_single.url, timeout=5)
    try:
        assert client.set("k", "é") and client.get("k") == "é".encode()
        assert client.eval("return ARGV[1] .. ARGV[2]", 0, "a", 7) == b"a7"
        connection = client.connection_pool.get_connection()
        try:
            assert connection._command_packer is client.connection_pool.connection_kwargs[
                "command_packer"]
            assert isinstance(connection._command_packer, _ArgumentPacker)
        finally:
            client.connection_pool.release(connection)
    finally:
        client.close()
