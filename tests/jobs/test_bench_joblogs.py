"""``hostmeter bench --job-logs-only``: the job-metrics pass timed on a synthetic job log beside a
bare parse, and a pass with nothing new; what it stored is gone afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner

from jobs.cli import cli as hostmeter_cli
from jobs.monitoring.store import job_metrics, log_checkpoints, log_runs, tenant_series
from jobs.synthetic.bench.joblogs import write_job_log


def test_the_log_has_four_lines_a_run_and_every_run_finishes(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    assert write_job_log(path, runs=250, tenants=7) == 1000
    events = [json.loads(line) for line in path.read_text().splitlines()]
    finished = [e for e in events if e["event"] == "job_finished"]
    assert len(finished) == 250 and len({e["run_id"] for e in finished}) == 250
    assert sum(e["event"] == "tenant_hour" for e in events) == 500
    assert {e["tenant"] for e in events if e["event"] == "tenant_hour"} == {
        f"bench-t{i}" for i in range(7)}


def test_job_logs_only_reports_every_figure_and_leaves_the_store_as_it_was(
        db_url: str, bench_engine: sa.Engine, tmp_path: Path) -> None:
    result = CliRunner().invoke(hostmeter_cli, ["bench", "--job-logs-only", "--job-log-runs",
                                                "400"], env={"HOSTMETER_DATABASE_URL": db_url})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["job_logs"]
    assert (report["runs"], report["lines"]) == (400, 1600)
    assert report["summary"]["runs"] == 400 and report["summary"]["tenant_items"] == 800
    assert report["floor_s"] > 0 and report["aggregate_s"] > 0
    assert abs(report["ratio"] - report["floor_s"] / report["aggregate_s"]) < 0.002  # rounded
    assert report["aggregate_peak_rss_mib"] is None or report["aggregate_peak_rss_mib"] > 10
    assert 0 < report["nothing_new_pass_s"] < report["nothing_new_command_s"]
    assert set(report["goals_met"]) == {"ratio", "peak_rss_mib", "nothing_new_s"}
    # the synthetic log's runs, metrics (around 2001), series and checkpoint are gone
    with bench_engine.connect() as conn:
        for table in (log_runs, job_metrics, tenant_series, log_checkpoints):
            assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0
