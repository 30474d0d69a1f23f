"""``hostmeter bench`` on every backend, at a tiny size: the figures, the checks, the safety.

No timing assertions: the bench is measured by people, CI only checks that it is correct.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from jobs.cli import cli
from jobs.synthetic.bench import tiers as bench
from jobs.synthetic.bench.generate import planned_counts
from jobs.synthetic.bench.report import run_bench
from jobs.synthetic.bench.tiers import BenchRefused, BenchTier, no_progress
from metering import db
from metering import models as m
from metering.ingest import UsageRecorder
from metering.settings import Settings

TINY = BenchTier(
    name="tiny", tenants=60, hosts=120, hours=30,
    ingest_tenants=2, ingest_hosts_per_tenant=3, ingest_hours=2, ingest_posts_per_host_hour=5,
    metrics_per_post=20, posts_per_call=7, single_posts=4,
)


def _figures(doc: dict[str, Any]) -> None:
    assert doc["generate"]["generate_s"] > 0
    for key in ("posts", "observations", "seconds", "posts_per_s", "observations_per_s"):
        assert doc["ingest"][key] > 0, key
        assert doc["ingest"]["single_post_calls"][key] > 0, key
    for key in ("snapshot_s", "per_hour_mean_s", "floor_s", "ratio"):
        assert doc["snapshot"][key] > 0, key
    assert doc["snapshot"]["status"] == "succeeded"
    assert doc["python"] and doc["server_version"]


def test_bench_measures_checks_and_counts_what_it_generated(bench_engine: sa.Engine) -> None:
    report = run_bench(bench_engine, Settings(), TINY, progress_factory=no_progress)
    doc = json.loads(json.dumps(report.as_dict()))
    assert doc["ok"] is True
    assert doc["backend"] == bench_engine.dialect.name
    assert doc["tier"] == "tiny" and doc["period"] == "2026-10"
    # October 2026 in Asia/Tokyo starts at 2026-09-30T15:00Z; the tiny tier takes 30 hours.
    assert doc["window"] == ["2026-09-30T15:00:00+00:00", "2026-10-01T21:00:00+00:00"]
    _figures(doc)
    assert all(check["ok"] for check in doc["checks"].values()), doc["checks"]
    assert set(doc["checks"]) == {
        "snapshot_hosts_equal_host_hours", "snapshot_metrics_equal_host_metrics",
        "every_hour_snapshotted", "generated_as_planned"}

    planned = planned_counts(TINY, 30)
    assert doc["generate"]["rows"] == planned
    assert planned["tenants"] == 60 and planned["hosts"] == 120
    # Hosts ending in 3 join late and hosts ending in 7 leave early; the rest post every hour.
    assert 96 * 30 < planned["host_hours"] < 120 * 30
    assert planned["plan_changes"] == 60 + 3  # tenants 5, 25, 45 convert from trial

    ingest = doc["ingest"]
    assert ingest["posts"] == 2 * 3 * 2 * 5 == TINY.ingest_posts
    assert ingest["observations"] == ingest["posts"] * 20
    assert ingest["calls"] == 9  # 60 posts, 7 per call
    assert doc["ingest"]["single_post_calls"]["calls"] == 4

    counts = doc["counts"]
    assert counts["tenants"] == 60 + 2 and counts["hosts"] == 120 + 6
    assert counts["host_hours"] == planned["host_hours"] + 3 * 2 * 2
    assert counts["host_hours_in_window"] == counts["host_hours"]
    with bench_engine.connect() as conn:
        snapshots = conn.execute(sa.select(sa.func.count()).select_from(m.usage_snapshots))
        assert counts["usage_snapshots"] == snapshots.scalar_one()
        # One plan change per tenant from the first hour (signups later); every tenant with
        # a plan or a host has a row in every hour it is active.
        assert counts["usage_snapshots"] >= doc["snapshot"]["floor_rows"] > 0
        hosts = doc["checks"]["snapshot_hosts_equal_host_hours"]
        assert hosts["snapshot_hosts"] == hosts["host_hours"] == counts["host_hours"]


def test_generated_fleet_has_the_documented_shape(bench_engine: sa.Engine) -> None:
    run_bench(bench_engine, Settings(), TINY, progress_factory=no_progress)
    hh, us = m.host_hours, m.usage_snapshots
    bench_hosts = hh.c.host_id.in_(
        sa.select(m.hosts.c.id).where(m.hosts.c.key.like("bench-h-%")))
    with bench_engine.connect() as conn:
        rows = conn.execute(
            sa.select(hh.c.kind, hh.c.metric_count, hh.c.metric_bits).where(bench_hosts)
        ).all()
        plans = dict(conn.execute(
            sa.select(us.c.plan, sa.func.count()).group_by(us.c.plan)).all())
        overage = conn.execute(
            sa.select(sa.func.sum(us.c.standard_overage), sa.func.sum(us.c.micro_overage))
        ).one()
    kinds = {k for k, _, _ in rows}
    assert kinds == {"standard", "micro"}
    # metric_bits is the bitmap of ordinals 0 … metric_count-1.
    assert all(int.from_bytes(b, "little").bit_count() == c for _, c, b in rows)
    assert any(k == "standard" and c > 200 for k, c, _ in rows)
    assert any(k == "micro" and c > 30 for k, c, _ in rows)
    assert overage[0] > 0 and overage[1] > 0
    assert {"standard", "free", "trial"} <= set(plans)
    assert plans["standard"] > plans["free"]


def test_bench_reruns_over_its_own_data(bench_engine: sa.Engine) -> None:
    first = run_bench(bench_engine, Settings(), TINY, progress_factory=no_progress)
    again = run_bench(bench_engine, Settings(), TINY, progress_factory=no_progress)
    assert first.ok and again.ok
    assert again.database_counts == first.database_counts
    assert again.generated.counts == first.generated.counts
    with bench_engine.connect() as conn:
        runs = conn.execute(
            sa.select(m.snapshot_hours.c.run_id).distinct()).scalars().all()
    assert runs == [again.snapshot.run_id]
    if bench_engine.dialect.name == "sqlite":  # switched off for the cleanup, and back on
        with bench_engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1


def _seed_real_tenant(engine: sa.Engine) -> None:
    UsageRecorder(engine).post_host_metrics(
        tenant="acme", host="h-1", kind="standard",
        at=datetime(2026, 10, 15, 10, 3, tzinfo=UTC), metrics=["loadavg5"],
    )


def _tenant_keys(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(m.tenants.c.key).order_by(m.tenants.c.key)).scalars())


def test_bench_refuses_a_database_with_real_tenants(bench_engine: sa.Engine) -> None:
    _seed_real_tenant(bench_engine)
    refused = r"1 tenant\(s\) that are not bench data \(e\.g\. 'acme'\)"
    with pytest.raises(BenchRefused, match=refused):
        run_bench(bench_engine, Settings(), TINY, progress_factory=no_progress)
    assert _tenant_keys(bench_engine) == ["acme"]
    with bench_engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(m.host_hours)).scalar() == 1


def test_bench_refuses_real_tenants_next_to_bench_data(bench_engine: sa.Engine) -> None:
    run_bench(bench_engine, Settings(), TINY, progress_factory=no_progress)
    _seed_real_tenant(bench_engine)
    with pytest.raises(BenchRefused):
        run_bench(bench_engine, Settings(), TINY, progress_factory=no_progress)
    assert "acme" in _tenant_keys(bench_engine)


def test_bench_refuses_to_orphan_other_data_of_bench_tenants(bench_engine: sa.Engine) -> None:
    run_bench(bench_engine, Settings(), TINY, progress_factory=no_progress)
    invoices = sa.Table("invoices", sa.MetaData(), autoload_with=bench_engine)
    with bench_engine.begin() as conn:
        tenant = conn.execute(
            sa.select(m.tenants.c.id).where(m.tenants.c.key == "bench-t-1")).scalar_one()
        conn.execute(sa.insert(invoices).values(
            tenant_id=tenant, period="2026-10", revision=9, status="final", currency="JPY",
            catalog_version="x", standard_units=1, micro_units=0, subtotal=1, tax=0, total=1,
            minor_units=0, content_hash="x", created_at=datetime(2026, 11, 1, tzinfo=UTC),
            created_by="test", run_id="x"))
    with pytest.raises(BenchRefused, match="final or void invoices still refer to bench tenants"):
        run_bench(bench_engine, Settings(), TINY, progress_factory=no_progress)
    with bench_engine.connect() as conn:  # nothing was deleted
        assert conn.execute(sa.select(sa.func.count()).select_from(m.hosts)).scalar() == 126
        if bench_engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1


# --- the command ---------------------------------------------------------------------------


def _invoke(db_url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--database-url", db_url, "bench", *args])


def test_command_prints_json_and_saves_it(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(bench.TIERS, "small", dataclasses.replace(TINY, name="small"))
    out = tmp_path / "bench.json"
    result = _invoke(db_url, "--tier", "small", "--out", str(out), "--startup-repeats", "0")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert json.loads(out.read_text()) == doc
    assert doc["ok"] is True and doc["tier"] == "small"
    assert doc["startup"] is None
    assert doc["database"] == db.redact_url(db_url)
    _figures(doc)


def test_command_refuses_real_tenants_with_exit_2(db_url: str) -> None:
    engine = db.create_engine(db_url)
    _seed_real_tenant(engine)
    result = _invoke(db_url)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hostmeter: error: refusing to bench")
    assert result.stdout == ""
    assert _tenant_keys(engine) == ["acme"]
    engine.dispose()


def test_command_rejects_a_bad_period_and_tier(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'never.db'}"
    result = _invoke(url, "--period", "2026-13")
    assert result.exit_code == 2
    assert "period '2026-13' is not a month" in result.stderr
    assert _invoke(url, "--tier", "huge").exit_code == 2
    assert not (tmp_path / "never.db").exists()


def test_startup_only_times_every_path_beside_its_floor_and_touches_no_database(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'never.db'}"
    result = _invoke(url, "--startup-only", "--startup-repeats", "1")
    assert result.exit_code == 0, result.output
    startup = json.loads(result.stdout)["startup"]
    paths = startup["paths"]
    assert set(paths) == {"floor", "help", "lambda_import", "run", "lambda_invoke"}
    floor = paths["floor"]["median_s"]
    for name, figures in paths.items():
        assert figures["median_s"] > 0, name
        assert figures["ratio"] == pytest.approx(figures["median_s"] / floor, abs=0.02), name
    # what each path imported is measured, not assumed: --help needs none of the heavy ones,
    # the Lambda handler none of the job-metrics pipeline's
    assert paths["help"]["heavy_imports"] == []
    assert not {"pandas", "numpy", "httpx", "prometheus_client", "boto3", "apscheduler"} & set(
        paths["lambda_import"]["heavy_imports"])
    assert set(startup["goal_met"]) == {"help", "lambda_import"}
    assert not (tmp_path / "never.db").exists()
