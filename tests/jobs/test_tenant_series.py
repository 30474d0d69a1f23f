"""Per-tenant series from the jobs' per-item log lines: hosts, metrics and posts per tenant-hour,
fleet totals, noisy-neighbour flags; each line counted once across passes and rotations."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from test_logmetrics_incremental import passes_at_once

from jobs.monitoring import logmetrics as lm
from jobs.monitoring import tenants as tn
from jobs.monitoring.store import job_metrics, tenant_flags, tenant_series

H0 = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 3, 0, 7, tzinfo=UTC)


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def tenant_hour(tenant: str, hour: datetime, std: int, micro: int = 0, metrics: int = 0, *,
                logged: datetime | None = None) -> str:
    logged = logged or hour + timedelta(hours=1, minutes=5)
    return json.dumps({"event": "tenant_hour", "level": "info", "timestamp": _iso(logged),
                       "job": "snapshot-usage", "run_id": "r", "logical_time": _iso(logged),
                       "tenant": tenant, "hour": _iso(hour), "std": std, "micro": micro,
                       "metrics": metrics, "over": 0, "svc": 0, "mon": 0,
                       "plan": "standard"}) + "\n"


def ingested(tenant: str, at: datetime, posts: int) -> str:
    return json.dumps({"event": "tenant_ingested", "level": "info", "timestamp": _iso(at),
                       "job": "ingest", "run_id": "i", "tenant": tenant, "posts": posts,
                       "records": posts}) + "\n"


def series(engine: Engine, name: str) -> dict[tuple[str, str], int]:
    s = tenant_series
    with engine.connect() as conn:
        return {(r.tenant, _iso(r.hour)): int(r.value) for r in conn.execute(
            sa.select(s).where(s.c.series == name))}


def fleet(engine: Engine, name: str) -> dict[str, Decimal]:
    with engine.connect() as conn:
        return {_iso(r.bucket): r.value for r in conn.execute(
            sa.select(job_metrics).where(job_metrics.c.name == name))}


def flags(engine: Engine) -> list[tuple[str, str, str, int, Decimal]]:
    f = tenant_flags
    with engine.connect() as conn:
        return [(r.series, r.tenant, _iso(r.hour), int(r.value), r.median)
                for r in conn.execute(sa.select(f).order_by(f.c.hour, f.c.series))]


def test_snapshot_lines_become_series_and_fleet_totals(engine: Engine, tmp_path: Path) -> None:
    log = tmp_path / "hostmeter.jsonl"
    log.write_text(tenant_hour("acme", H0, 3, 2, 900) + tenant_hour("globex", H0, 10, 0, 50)
                   + tenant_hour("acme", H0 + timedelta(hours=1), 4, 0, 1000))
    out = lm.aggregate(engine, [log], now=NOW)
    assert (out.tenant_items, out.tenant_hours) == (3, 3)
    assert series(engine, "hosts") == {("acme", "2026-11-01T00:00:00Z"): 5,
                                       ("globex", "2026-11-01T00:00:00Z"): 10,
                                       ("acme", "2026-11-01T01:00:00Z"): 4}
    assert series(engine, "metrics")[("acme", "2026-11-01T00:00:00Z")] == 900
    assert fleet(engine, tn.FLEET_METRICS["hosts"]) == {"2026-11-01T00:00:00Z": 15,
                                                        "2026-11-01T01:00:00Z": 4}
    assert fleet(engine, tn.FLEET_METRICS["metrics"])["2026-11-01T00:00:00Z"] == 950


def test_the_latest_snapshot_of_an_hour_wins_whatever_order_lines_are_read_in(
        engine: Engine, tmp_path: Path) -> None:
    log = tmp_path / "hostmeter.jsonl"
    late = H0 + timedelta(hours=3, minutes=5)  # a look-back re-snapshot, 3 hours later
    log.write_text(tenant_hour("acme", H0, 3) + tenant_hour("acme", H0, 7, logged=late))
    lm.aggregate(engine, [log], now=NOW)
    assert series(engine, "hosts") == {("acme", "2026-11-01T00:00:00Z"): 7}
    other = tmp_path / "older.jsonl"  # an older line read in a later pass changes nothing
    other.write_text(tenant_hour("acme", H0, 2, logged=H0 + timedelta(hours=1, minutes=6)))
    lm.aggregate(engine, [other], now=NOW)
    assert series(engine, "hosts") == {("acme", "2026-11-01T00:00:00Z"): 7}
    assert fleet(engine, tn.FLEET_METRICS["hosts"]) == {"2026-11-01T00:00:00Z": 7}


def test_posts_are_summed_once_across_passes_rename_and_copytruncate(
        engine: Engine, tmp_path: Path) -> None:
    """The per-tenant post sums are not keyed by run: each line must be read once, through a
    rename rotation and a copy-then-truncate rotation."""
    log = tmp_path / "hostmeter.jsonl"
    at = H0 + timedelta(minutes=10)
    log.write_text(ingested("acme", at, 100) + ingested("globex", at, 5))
    lm.aggregate(engine, [tmp_path], now=NOW)
    with log.open("a") as f:
        f.write(ingested("acme", at + timedelta(minutes=1), 20))
    os.rename(log, tmp_path / "hostmeter.jsonl.1")  # rename rotation, one line not yet read
    log.write_text(ingested("acme", at + timedelta(minutes=2), 3))
    lm.aggregate(engine, [tmp_path], now=NOW)
    assert series(engine, "posts")[("acme", "2026-11-01T00:00:00Z")] == 123

    with log.open("a") as f:
        f.write(ingested("acme", at + timedelta(minutes=3), 1000))
    shutil.copyfile(log, tmp_path / "hostmeter.jsonl.2")  # copytruncate
    log.write_text("")
    with log.open("a") as f:
        f.write(ingested("acme", at + timedelta(minutes=4), 7))
    lm.aggregate(engine, [tmp_path], now=NOW)
    lm.aggregate(engine, [tmp_path], now=NOW)
    assert series(engine, "posts") == {("acme", "2026-11-01T00:00:00Z"): 1130,
                                       ("globex", "2026-11-01T00:00:00Z"): 5}
    assert fleet(engine, tn.FLEET_METRICS["posts"]) == {"2026-11-01T00:00:00Z": 1135}


def test_compressed_rotations_are_not_read(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "hostmeter.jsonl.3.gz").write_bytes(b"\x1f\x8b\x08\x00garbage\n")
    out = lm.aggregate(engine, [tmp_path], now=NOW)
    assert (out.files, out.malformed) == (0, 0)


def _steady(tenant: str, hours: int, hosts: int) -> str:
    return "".join(tenant_hour(tenant, H0 + timedelta(hours=h), hosts, 0, hosts * 100)
                   for h in range(hours))


def test_a_jump_to_k_times_the_trailing_median_is_flagged_and_cleared_when_it_goes(
        engine: Engine, tmp_path: Path) -> None:
    log = tmp_path / "hostmeter.jsonl"
    jump = H0 + timedelta(hours=24)
    log.write_text(_steady("noisy", 24, 10) + _steady("calm", 24, 10)
                   + tenant_hour("noisy", jump, 30, 0, 1000)  # 3x hosts, 1x metrics
                   + tenant_hour("calm", jump, 29, 0, 1000))  # just under 3x
    lm.aggregate(engine, [log], now=NOW)
    assert flags(engine) == [("hosts", "noisy", "2026-11-02T00:00:00Z", 30, Decimal(10))]
    assert fleet(engine, tn.NOISY)["2026-11-02T00:00:00Z"] == 1
    assert fleet(engine, tn.NOISY)["2026-11-01T23:00:00Z"] == 0

    with log.open("a") as f:  # the hour is snapshotted again (look-back): back to normal
        f.write(tenant_hour("noisy", jump, 12, 0, 1000, logged=jump + timedelta(hours=3)))
    lm.aggregate(engine, [log], now=NOW)
    assert flags(engine) == []
    assert fleet(engine, tn.NOISY)["2026-11-02T00:00:00Z"] == 0


def test_a_short_history_or_a_small_tenant_is_not_flagged(engine: Engine,
                                                          tmp_path: Path) -> None:
    log = tmp_path / "hostmeter.jsonl"
    log.write_text(_steady("new", 3, 10) + tenant_hour("new", H0 + timedelta(hours=3), 90)
                   + _steady("tiny", 24, 1) + tenant_hour("tiny", H0 + timedelta(hours=24), 9))
    lm.aggregate(engine, [log], now=NOW)
    assert flags(engine) == []


def test_the_rule_is_configurable(engine: Engine, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTMETER_NOISY_FACTOR", "2")
    monkeypatch.setenv("HOSTMETER_NOISY_MIN_POINTS", "3")
    log = tmp_path / "hostmeter.jsonl"
    log.write_text(_steady("a", 3, 10) + tenant_hour("a", H0 + timedelta(hours=3), 20))
    lm.aggregate(engine, [log], now=NOW)
    assert [(s, t, v) for s, t, _, v, _ in flags(engine)] == [("hosts", "a", 20)]
    monkeypatch.setenv("HOSTMETER_NOISY_FACTOR", "0.5")
    with pytest.raises(Exception, match="HOSTMETER_NOISY_FACTOR"):
        tn.NoisyRule.from_env()


def test_a_line_without_the_fields_is_ignored_not_fatal(engine: Engine, tmp_path: Path) -> None:
    log = tmp_path / "hostmeter.jsonl"
    log.write_text('{"event": "tenant_hour", "tenant": "acme"}\n' + tenant_hour("acme", H0, 1))
    out = lm.aggregate(engine, [log], now=NOW)
    assert out.tenant_items == 1 and out.malformed == 0
    assert series(engine, "hosts") == {("acme", "2026-11-01T00:00:00Z"): 1}


def test_two_passes_at_once_sum_posts_once(engine: Engine, db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "hostmeter.jsonl"
    log.write_text("".join(ingested(f"t{i % 40}", H0 + timedelta(minutes=i % 60), 1)
                           for i in range(2000)))
    passes_at_once(db_url, log)
    assert sum(series(engine, "posts").values()) == 2000


def test_a_long_pass_refreshes_as_it_goes_with_the_same_result(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Values written and flags refreshed every few lines (as a first pass over a long history
    does, to keep memory flat) give the flags and totals of one refresh at the end."""
    monkeypatch.setattr(tn, "HOLD", 3)
    monkeypatch.setattr(tn, "REFRESH", 5)
    log = tmp_path / "hostmeter.jsonl"
    jump = H0 + timedelta(hours=24)
    log.write_text(_steady("noisy", 24, 10) + _steady("calm", 24, 10)
                   + tenant_hour("noisy", jump, 30, 0, 1000) + tenant_hour("calm", jump, 11))
    out = lm.aggregate(engine, [log], now=NOW)
    assert out.tenant_hours == 50
    assert flags(engine) == [("hosts", "noisy", "2026-11-02T00:00:00Z", 30, Decimal(10))]
    hosts = fleet(engine, tn.FLEET_METRICS["hosts"])
    assert len(hosts) == 25 and hosts["2026-11-02T00:00:00Z"] == 41
    assert set(hosts.values()) == {Decimal(20), Decimal(41)}


def test_a_raised_flag_is_logged_once_after_the_commit(engine: Engine, tmp_path: Path) -> None:
    import io

    from jobs.runtime.logconfig import configure_logging

    log = tmp_path / "hostmeter.jsonl"
    jump = H0 + timedelta(hours=24)
    log.write_text(_steady("noisy", 24, 10) + tenant_hour("noisy", jump, 30, 0, 1000))
    path = configure_logging(str(tmp_path / "out"), stream=io.StringIO())
    lm.aggregate(engine, [log], now=NOW)
    lm.aggregate(engine, [log], now=NOW)  # nothing new: the standing flag is not logged again
    with log.open("a") as f:  # re-snapshotted, still noisy: still standing, not raised again
        f.write(tenant_hour("noisy", jump, 31, 0, 1000, logged=jump + timedelta(hours=2)))
    lm.aggregate(engine, [log], now=NOW)
    configure_logging(None, stream=io.StringIO())
    assert path is not None
    raised = [json.loads(line) for line in path.read_text().splitlines()
              if '"noisy_neighbour"' in line]
    assert [(e["tenant"], e["series"], e["hour"], e["value"], Decimal(e["median"]),
             Decimal(e["ratio"])) for e in raised] == [
        ("noisy", "hosts", "2026-11-02T00:00:00Z", 30, 10, 3)]
