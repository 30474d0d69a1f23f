"""``hostmeter hotpath``: the shipped protocol as a caller in another language loads it, and the
status of what Redis holds, against a real ``redis-server``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from redisservers import RedisServer

from metering.hotpath import PostRecorder, connect, epoch_hour


def hostmeter(tmp_path: Path, *args: str, redis_url: str | None = None,
              ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOSTMETER_LOG_DIR": str(tmp_path / "logs")}
    env.pop("HOSTMETER_REDIS_URL", None)
    if redis_url is not None:
        env["HOSTMETER_REDIS_URL"] = redis_url
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_the_printed_script_is_what_redis_loads_under_the_printed_sha(
        tmp_path: Path, redis_single: RedisServer) -> None:
    text = hostmeter(tmp_path, "hotpath", "script").stdout
    sha = hostmeter(tmp_path, "hotpath", "script", "--sha").stdout.strip()
    path = Path(hostmeter(tmp_path, "hotpath", "script", "--path").stdout.strip())
    assert path.read_text("utf-8") == text and "EVALSHA" in text
    assert redis_single.cli("SCRIPT", "LOAD", text).strip() == sha
    hour = epoch_hour(datetime(2026, 10, 15, 10, 3, tzinfo=UTC))
    reply = redis_single.cli("EVALSHA", sha, "3", "hm:{acme}:dict:host",
                             f"hm:{{acme}}:host:{hour}", f"hm:{{acme}}:posts:{hour}",
                             "h-1", "standard", "loadavg5", "cpu.user")
    assert reply.strip() == "2"


def test_status_counts_the_held_tenant_hours_and_posts(
        tmp_path: Path, redis_single: RedisServer) -> None:
    recorder = PostRecorder(connect(redis_single.url, timeout=2))
    at = datetime(2026, 10, 15, 10, 3, tzinfo=UTC)
    for tenant in ("acme", "globex"):
        for minute in range(3):
            recorder.host_post(tenant=tenant, host="h-1", kind="standard",
                               at=at.replace(minute=minute), metrics=["a", "b"])
    recorder.host_post(tenant="acme", host="h-1", kind="micro",
                       at=at.replace(hour=11), metrics=["a"])
    done = hostmeter(tmp_path, "hotpath", "status", "--format", "json",
                     redis_url=redis_single.url)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["tenants"] == 2
    assert status["hours"] == [
        {"hour": "2026-10-15T10:00:00Z", "tenants": 2, "posts": 6},
        {"hour": "2026-10-15T11:00:00Z", "tenants": 1, "posts": 1},
    ]
    assert status["used_memory_bytes"] > 0
    table = hostmeter(tmp_path, "hotpath", "status", redis_url=redis_single.url)
    assert "2026-10-15T10:00:00Z" in table.stdout and "2 tenant(s)" in table.stdout


def test_status_without_a_hot_path_or_with_redis_down_is_one_line(tmp_path: Path) -> None:
    unset = hostmeter(tmp_path, "hotpath", "status")
    assert unset.returncode == 2
    assert unset.stderr.strip().splitlines() == [
        "hostmeter: error: HOSTMETER_REDIS_URL is not set: there is no hot path to show"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = hostmeter(tmp_path, "hotpath", "status",
                     redis_url=f"redis://:tok-secret-1@127.0.0.1:{port}/0")
    assert down.returncode == 1
    lines = down.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hostmeter: error: Redis did not answer")
    assert "tok-secret-1" not in down.stderr and "Traceback" not in down.stderr
