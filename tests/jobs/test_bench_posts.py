"""The bench's real ingest path (a JSON Lines file through ``hostmeter ingest`` beside a bare
parse, two processes on disjoint tenants), the month filled from a snapshotted day for the
close, and the peak memory of each step. No timing assertions: figures exist and add up."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import pytest
import sqlalchemy as sa

from jobs.synthetic.bench.memory import PeakRSS
from jobs.synthetic.bench.posts import parse_floor, write_posts
from jobs.synthetic.bench.report import run_bench
from jobs.synthetic.bench.tiers import TIERS, BenchTier, no_progress
from metering import models as m
from metering.settings import Settings

START = datetime(2026, 10, 5, 0, tzinfo=UTC)

DAY = BenchTier(
    name="day", tenants=30, hosts=60, hours=24, fill_month=True,
    ingest_tenants=1, ingest_hosts_per_tenant=2, ingest_hours=1, ingest_posts_per_host_hour=3,
    metrics_per_post=20, posts_per_call=3, single_posts=2,
    file_tenants=3, file_hosts=9, file_hours=1,
)


def _read(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_posts_file_every_host_every_minute_skewed_and_mostly_steady(tmp_path: Path) -> None:
    f = write_posts(tmp_path / "p.jsonl", tenants=5, hosts=40, start=START, hours=2,
                    metrics_per_post=20)
    posts = _read(f.path)
    assert f.lines == len(posts) == 40 * 120 and f.observations == 40 * 120 * 20
    assert f.hosts == 40 and f.tenants == 5 and f.hours == 2
    per_host = Counter(p["host"] for p in posts)
    assert set(per_host.values()) == {120}  # every host every minute
    hosts_of = Counter(t for t, _ in {(p["tenant"], p["host"]) for p in posts})
    assert hosts_of.most_common(1)[0][1] > 1.5 * 40 // 5  # a big tenant
    assert min(hosts_of.values()) < 40 // 5  # and small ones
    first = [p["metrics"] for p in posts if p["host"] == "bench-post-h7"]
    assert all(len(ms) == 20 for ms in first)
    assert all(a[:18] == b[:18] for a, b in pairwise(first))  # 90 % steady
    assert len({tuple(ms) for ms in first}) > 1  # the rest rotates
    floor_s, keys = parse_floor(f.path)
    assert floor_s > 0 and keys == 40 * 2


def test_posts_file_parts_split_the_fleet_by_tenant(tmp_path: Path) -> None:
    whole = _read(write_posts(tmp_path / "w.jsonl", tenants=6, hosts=30, start=START,
                              hours=1).path)
    parts = [_read(write_posts(tmp_path / f"p{i}.jsonl", tenants=6, hosts=30, start=START,
                               hours=1, part=(i, 2)).path) for i in range(2)]
    tenants = [{p["tenant"] for p in part} for part in parts]
    assert tenants[0] and tenants[1] and not tenants[0] & tenants[1]
    assert sorted(map(json.dumps, parts[0] + parts[1])) == sorted(map(json.dumps, whole))


def test_peak_rss_sees_the_block_and_not_what_came_before() -> None:
    ballast = bytearray(96 << 20)  # resident before the block: not the block's peak
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    del ballast
    with PeakRSS() as small:
        pass
    with PeakRSS() as big:
        block = bytearray(64 << 20)
        block[:: 4096] = b"y" * len(block[:: 4096])
        del block
    if small.mib is None or small.start_mib is None:
        pytest.skip("no /proc here: peaks are not measured")
    assert big.mib is not None and big.start_mib is not None
    assert big.mib - big.start_mib >= 48  # the block's 64 MiB
    assert small.mib - small.start_mib < 32  # the ballast's peak was reset


def test_bench_ingests_a_file_and_fills_the_month_for_the_close(
    bench_engine: sa.Engine,
) -> None:
    report = run_bench(bench_engine, Settings(), DAY, progress_factory=no_progress)
    doc = json.loads(json.dumps(report.as_dict()))
    assert doc["ok"] is True, doc["checks"]
    f = doc["ingest_file"]
    assert f["lines"] == 9 * 60 and f["host_hours"] == 9 and f["hosts"] == 9
    assert f["first_hour_rows_written"] == 9 and f["rows_written"] == 9
    assert f["reingest_rows_written"] == 0
    assert f["summary"]["records"] == 9 * 60 and f["summary"]["rejected"] == 0
    for key in ("floor_s", "ingest_s", "first_hour_s", "reingest_s"):
        assert f[key] > 0, key
    assert abs(f["ratio"] - f["floor_s"] / f["ingest_s"]) < 0.01  # floor / ingest
    parallel = doc["ingest_parallel"]
    if bench_engine.dialect.name == "postgresql":
        assert parallel["rows_written"] == 9 and sum(parallel["lines_per_part"]) == 9 * 60
        assert parallel["one_process_s"] > 0 and parallel["two_processes_s"] > 0
    else:
        assert "one writer" in parallel["skipped"]
    # a day snapshotted, the month (October 2026 in Tokyo: 744 hours) filled, then closed
    assert doc["snapshot"]["hours"] == 24 and doc["month_filled_s"] > 0
    with bench_engine.connect() as conn:
        hours = conn.execute(sa.select(sa.func.count()).select_from(m.snapshot_hours))
        assert hours.scalar_one() == 744
        per_hour = conn.execute(
            sa.select(m.usage_snapshots.c.hour, sa.func.count())
            .group_by(m.usage_snapshots.c.hour)).all()
    day = {h.replace(tzinfo=UTC) if h.tzinfo is None else h: n for h, n in per_hour}
    assert len(day) == 744
    first_day = sorted(day)[:24]
    assert [day[h] for h in sorted(day)[24:48]] == [day[h] for h in first_day]
    assert doc["close"]["status"] == "succeeded" and doc["close"]["invoices_written"] > 0
    rss = doc["peak_rss_mib"]
    if rss["snapshot"] is not None:
        assert all(rss[k] > 0 for k in ("generate", "ingest_api", "snapshot", "close",
                                        "ingest_file"))


def test_tiers_large_is_the_service_size() -> None:
    large = TIERS["large"]
    assert (large.tenants, large.hosts, large.hours, large.fill_month) == (
        20_000, 300_000, 24, True)
    assert all(t.file_hosts for t in TIERS.values())


def test_large_tier_is_refused_on_sqlite_before_anything_is_written(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from jobs.cli import cli

    url = f"sqlite:///{tmp_path / 'never.db'}"
    result = CliRunner().invoke(cli, ["--database-url", url, "bench", "--tier", "large"])
    assert result.exit_code == 2
    assert "the large tier runs on PostgreSQL" in result.stderr
    assert not (tmp_path / "never.db").exists()


def test_a_child_peak_is_its_own_not_the_bench_process(tmp_path: Path) -> None:
    """The bench holds 300 MiB; the child it measures touches 64 MiB: the figure is the
    child's (the bug: Linux counts the starting process's peak into a child's, so every
    ingest of a large bench looked as big as the bench)."""
    import subprocess
    import sys

    from jobs.synthetic.bench.memory import MEASURED_CHILD

    ballast = bytearray(300 << 20)
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    child = "b = bytearray(64 << 20); b[::4096] = b'y' * len(b[::4096])"
    done = subprocess.run([sys.executable, "-c", MEASURED_CHILD, sys.executable, "-c", child],
                          capture_output=True, text=True, check=True)
    kib = int(done.stderr.strip().splitlines()[-1].split()[1])
    assert 64 * 1024 < kib < 200 * 1024, kib
    del ballast
