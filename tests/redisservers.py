"""Real Redis servers for the tests: a private ``redis-server`` on a spare loopback port, and a
3-node Redis Cluster (``--cluster-enabled yes`` + ``redis-cli --cluster create``).

Each server runs in its own temporary directory, keeps nothing on disk, and can be stopped and
started again on the same port (a test stops it mid-run to see the post path fail fast). The
shared server on 6379 is never touched.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["REDIS_SERVER", "RedisCluster", "RedisServer", "redis_cluster", "redis_server"]

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def spare_port(*, bus: bool = False) -> int:
    """A free loopback port; with ``bus``, one whose cluster bus port (+10000) is free too."""
    if not bus:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        if _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@dataclass
class RedisServer:
    """One ``redis-server`` process: its port, and how to stop and start it again."""

    directory: Path
    port: int
    cluster: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                "--protected-mode", "no", "--loglevel", "warning"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file",
                     str(self.directory / "nodes.conf"), "--cluster-node-timeout", "2000"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _answers(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def cli(self, *args: str, input: bytes | None = None) -> str:
        """``redis-cli -p PORT ARGS``: what it printed (raises when it fails)."""
        assert REDIS_CLI is not None
        done = subprocess.run([REDIS_CLI, "-p", str(self.port), *args], input=input,
                              capture_output=True, check=True, timeout=60)
        return done.stdout.decode()


@dataclass
class RedisCluster:
    """Three primaries (no replicas) on loopback ports, all 16,384 slots assigned."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def flushall(self) -> None:
        for node in self.nodes:
            node.cli("FLUSHALL")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _need_redis() -> None:
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server / redis-cli not installed (Debian's redis-server package; "
                    ".ci/run installs it)")


@contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    _need_redis()
    server = RedisServer(directory, spare_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def redis_cluster(directory: Path, size: int = 3) -> Iterator[RedisCluster]:
    _need_redis()
    nodes = []
    try:
        for i in range(size):
            path = directory / f"node{i}"
            path.mkdir()
            node = RedisServer(path, spare_port(bus=True), cluster=True)
            node.start()
            nodes.append(node)
        nodes[0].cli("--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                     "--cluster-replicas", "0", "--cluster-yes")
        deadline = time.monotonic() + 20
        while not all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        yield RedisCluster(nodes)
    finally:
        for node in nodes:
            with suppress(Exception):
                node.stop()
