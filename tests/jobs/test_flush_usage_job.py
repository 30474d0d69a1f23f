"""``flush-usage`` as a job, and ``snapshot-usage`` with the hot path configured: real Redis
(a single server and a 3-node cluster), SQLite and PostgreSQL, the CLI through click.

- ``snapshot-usage`` with ``HOSTMETER_REDIS_URL`` snapshots posts that are only in Redis (the
  same rows as when the posts were ingested), and releases nothing; with Redis stopped it fails
  with a one-line error before freezing any hour.
- ``hostmeter run flush-usage --at T`` with and without ``HOSTMETER_REDIS_URL``: exit 0, the
  counts, the hours older than ``release_before(T)`` released; a re-run changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from hotpathfleet import billed, ingest_line, recorded, second_database
from redisservers import RedisServer
from sqlalchemy.engine import Engine

from jobs import flush_usage as flush_job
from jobs import snapshot_usage
from jobs.cli import cli as hostmeter_cli
from jobs.runtime.context import JobContext, run_job
from metering import models as m
from metering.flush import held_hours
from metering.hotpath import PostRecorder, connect
from metering.ingest import ingest_lines
from metering.records import HostPost, PlanChange, ServicePost
from metering.settings import Settings

T = datetime(2026, 10, 15, 10, 5, tzinfo=UTC)  # the 10:05 trigger: window 06:00..09:00


def at(hh: int, mm: int = 0) -> datetime:
    return datetime(2026, 10, 15, hh, mm, tzinfo=UTC)


def posts() -> list[HostPost | ServicePost]:
    """Posts in 04:00 and 05:00 (before the window), 06:00..09:00 (in it) and 10:00 (after)."""
    out: list[HostPost | ServicePost] = []
    for hour in (4, 5, 6, 7, 8, 9, 10):
        for tenant, hosts in (("acme", 3), ("globex", 1), ("hooli", 2)):
            for i in range(hosts):
                names = [f"m{j}" for j in range(40 * (i + 1))] + [f"h{hour}"]
                kind = "micro" if i == 2 else "standard"
                for minute in (1, 31):
                    out.append(HostPost(tenant=tenant, host=f"h-{i}", kind=kind,
                                        at=at(hour, minute), metrics=tuple(names)))
        out.append(ServicePost(tenant="acme", service="web", at=at(hour, 7),
                               metrics=("req", f"s{hour}")))
    return out


PLANS = [PlanChange(tenant=t, plan="standard", at=at(0)) for t in ("acme", "globex", "hooli")]


@pytest.fixture
def twin(request: pytest.FixtureRequest, backend: str, tmp_path: Path
         ) -> Iterator[tuple[Engine, str]]:
    """A second fresh, migrated database on the same backend as ``engine``."""
    with second_database(request, backend, tmp_path) as pair:
        yield pair


def snapshot_run(engine: Engine, settings: Settings) -> Any:
    ctx = JobContext(engine=engine, settings=settings, clock=lambda: T)
    return run_job("snapshot-usage", snapshot_usage.run, ctx, T)


def snapshot_rows(engine: Engine) -> list[Any]:
    rows: list[Any] = billed(engine)["usage_snapshots"]
    return rows


def ledger_hours(engine: Engine) -> list[datetime]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(m.snapshot_hours.c.hour).order_by(
            m.snapshot_hours.c.hour)).scalars())


def record(url: str, cluster: bool, items: list[HostPost | ServicePost]) -> None:
    recorder = PostRecorder.from_url(url, cluster=cluster, timeout=5)
    try:
        assert recorder.record_many(items).recorded == len(items)
    finally:
        recorder.close()


def test_release_before_is_the_snapshots_look_back() -> None:
    assert flush_job.release_before(T) == at(6)  # 10:05 snapshots 06:00..09:00 last
    assert flush_job.release_before(at(10)) == at(6)
    assert flush_job.release_before(T, lookback=0) == at(9)


# --- snapshot-usage flushes first ---------------------------------------------------------------


def test_snapshot_usage_snapshots_posts_that_are_only_in_redis(
    hot_path: tuple[str, bool], engine: Engine, db_url: str, twin: tuple[Engine, str]
) -> None:
    url, cluster = hot_path
    ingest_lines(engine, [ingest_line(p) for p in PLANS])
    record(url, cluster, posts())
    settings = Settings(database_url=db_url, redis_url=url, redis_cluster=cluster)

    result = snapshot_run(engine, settings)
    assert result.status == "succeeded", result.error
    assert result.counts["flushed_tenant_hours"] == 3 * 4  # the window's hours only
    assert ledger_hours(engine) == [at(h) for h in (6, 7, 8, 9)]

    other, other_url = twin
    ingest_lines(other, [ingest_line(p) for p in [*PLANS, *posts()]])
    assert snapshot_run(other, Settings(database_url=other_url)).status == "succeeded"
    assert snapshot_rows(engine) == snapshot_rows(other)
    assert {(r[0], r[1]) for r in snapshot_rows(engine)} == {
        (t, at(h)) for t in ("acme", "globex", "hooli") for h in (6, 7, 8, 9)}

    # only the window was flushed, and nothing left Redis (releasing is flush-usage's)
    assert {hour for (_, _, hour) in recorded(engine)["host_hours"]} == {
        at(h) for h in (6, 7, 8, 9)}
    client = connect(url, cluster=cluster, timeout=5)
    try:
        assert {t: len(hs) for t, hs in held_hours(client).items()} == {
            "acme": 7, "globex": 7, "hooli": 7}
    finally:
        client.close()


def invoke(*args: str, env: dict[str, str]) -> Result:
    return CliRunner().invoke(hostmeter_cli, list(args), env=env)


def test_snapshot_usage_with_redis_stopped_fails_and_freezes_nothing(
    redis_single: RedisServer, engine: Engine, db_url: str
) -> None:
    ingest_lines(engine, [ingest_line(p) for p in PLANS])
    record(redis_single.url, False, posts())
    redis_single.stop()
    try:
        result = snapshot_run(engine, Settings(database_url=db_url, redis_url=redis_single.url))
        assert result.status == "failed"
        assert result.error is not None and "Redis" in result.error, result.error
        assert ledger_hours(engine) == [] and snapshot_rows(engine) == []

        out = invoke("run", "snapshot-usage", "--at", T.isoformat(),
                     env={"HOSTMETER_DATABASE_URL": db_url,
                          "HOSTMETER_REDIS_URL": redis_single.url})
    finally:
        redis_single.start()
    assert out.exit_code == 1, out.output
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("hostmeter: error")]
    assert len(errors) == 1 and "Redis" in errors[0], out.stderr
    assert ledger_hours(engine) == [] and snapshot_rows(engine) == []
    assert recorded(engine)["host_hours"] == {}


def test_snapshot_usage_with_a_cluster_url_nobody_answers_fails_clearly(
    engine: Engine, db_url: str
) -> None:
    from redisservers import spare_port

    settings = Settings(database_url=db_url, redis_url=f"redis://127.0.0.1:{spare_port()}/0",
                        redis_cluster=True)
    result = snapshot_run(engine, settings)
    assert result.status == "failed"
    assert result.error is not None and "did not answer" in result.error, result.error
    assert ledger_hours(engine) == []


# --- hostmeter run flush-usage ------------------------------------------------------------------


def test_run_flush_usage_without_a_hot_path_does_nothing(engine: Engine, db_url: str) -> None:
    out = invoke("run", "flush-usage", "--at", T.isoformat(), "--format", "json",
                 env={"HOSTMETER_DATABASE_URL": db_url})
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert (doc["status"], doc["counts"]) == (
        "succeeded", {"tenant_hours": 0, "hot_path": "not configured"})
    assert recorded(engine)["host_hours"] == {}


def test_run_flush_usage_moves_every_hour_and_releases_the_old_ones(
    hot_path: tuple[str, bool], engine: Engine, db_url: str, twin: tuple[Engine, str]
) -> None:
    url, cluster = hot_path
    record(url, cluster, posts())
    env = {"HOSTMETER_DATABASE_URL": db_url, "HOSTMETER_REDIS_URL": url,
           "HOSTMETER_REDIS_CLUSTER": "true" if cluster else "false"}

    out = invoke("run", "flush-usage", "--at", T.isoformat(), "--format", "json", env=env)
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["status"] == "succeeded"
    counts = doc["counts"]
    # 3 tenants × 7 hours; 04:00 and 05:00 are before release_before(10:05) = 06:00
    assert {k: counts[k] for k in ("tenant_hours", "host_hours", "service_hours", "released",
                                   "kept", "skipped")} == {
        "tenant_hours": 21, "host_hours": 42, "service_hours": 7, "released": 6, "kept": 15,
        "skipped": 0}
    assert counts["posts"] == len(posts())
    client = connect(url, cluster=cluster, timeout=5)
    try:
        assert {t: sorted(hs) for t, hs in held_hours(client).items()} == {
            t: [int(at(h).timestamp()) // 3600 for h in range(6, 11)]
            for t in ("acme", "globex", "hooli")}
    finally:
        client.close()

    other, _ = twin
    ingest_lines(other, [ingest_line(p) for p in posts()])
    assert recorded(engine) == recorded(other)

    # the same trigger again: skipped; forced: the database as it was, nothing more released
    before = recorded(engine)
    again = invoke("run", "flush-usage", "--at", (T + timedelta(minutes=2)).isoformat(),
                   "--format", "json", env=env)
    assert again.exit_code == 0 and json.loads(again.stdout)["status"] == "skipped"
    forced = invoke("run", "flush-usage", "--at", T.isoformat(), "--force", "--format", "json",
                    env=env)
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["counts"]["tenant_hours"] == 15
    assert json.loads(forced.stdout)["counts"]["released"] == 0
    assert recorded(engine) == before
