"""aggregate-job-logs costs what is new: a pass recomputes only the buckets its new runs fall
in, reads files in blocks, and two passes at once count every line once."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from test_logmetrics import finished, points

from jobs.monitoring import logmetrics as lm
from jobs.monitoring.store import job_metrics
from metering import db

NOW = datetime(2026, 11, 1, 3, 7, tzinfo=UTC)
START = datetime(2026, 10, 31, 0, 0, tzinfo=UTC)


def history(n: int, seed: int = 7) -> list[str]:
    """``n`` job_finished lines over a day, with other events and a few malformed lines."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        at = (START + timedelta(seconds=rng.randrange(86_400))).isoformat()
        job = rng.choice(["snapshot-usage", "close-billing-period", "flush-usage"])
        out.append(finished(f"run-{i}", job, rng.choice(["succeeded", "failed", "partial"]),
                            at, rng.random() * 10, tenants_expected=rng.randrange(50),
                            tenants_processed=rng.randrange(50), host_hours=rng.randrange(999),
                            billed_amount=str(rng.randrange(10_000))))
        if i % 7 == 0:
            out.append('{"event": "tenant_hour", "tenant": "acme", "hosts": 3}\n')
        if i % 50 == 0:
            out.append("{not json\n")
    return out


def metric_rows(engine: Engine) -> dict[tuple[str, str, str, str], Decimal]:
    with engine.connect() as conn:
        return {(r.name, r.bucket.isoformat(), r.job, r.status): r.value
                for r in conn.execute(sa.select(job_metrics))
                if r.name not in (lm.MALFORMED, lm.OVERDUE)}


def test_many_small_passes_equal_one_pass_over_everything(
        engine: Engine, db_url: str, tmp_path: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Lines appended in pieces (one split mid-line), a pass after each, give exactly the
    metrics of one pass over the whole file into a fresh database (the definition: each bucket
    is the sum of its runs)."""
    lines = history(600)
    log = tmp_path / "hostmeter.jsonl"
    text = "".join(lines)
    cuts = sorted(random.Random(3).sample(range(1, len(text)), 9))
    done = 0
    for cut in [*cuts, len(text)]:
        with log.open("a") as f:
            f.write(text[done:cut])
        done = cut
        lm.aggregate(engine, [log], now=NOW)
    incremental = metric_rows(engine)

    other = tmp_path_factory.mktemp("fresh") / "hostmeter.jsonl"
    other.write_text(text)
    fresh = _fresh_engine(db_url, tmp_path)
    try:
        lm.aggregate(fresh, [other], now=NOW)
        assert incremental == metric_rows(fresh)
        assert len(incremental) > 100
    finally:
        fresh.dispose()


def _fresh_engine(db_url: str, tmp_path: Path) -> Engine:
    """A second, empty database on the same backend as ``db_url``."""
    url = sa.engine.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        engine = db.create_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    else:
        name = f"{url.database}_fresh"
        admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        admin.dispose()
        engine = db.create_engine(url.set(database=name).render_as_string(False))
    db.upgrade(engine)
    return engine


def test_a_pass_updates_only_the_buckets_its_new_runs_fall_in(
        engine: Engine, tmp_path: Path) -> None:
    """A marker in each bucket: a pass with nothing new leaves both; a new run adds to its own
    bucket's value (999 + 1), never recomputes or touches the other."""
    log = tmp_path / "hostmeter.jsonl"
    log.write_text(finished("a", "j", "succeeded", "2026-11-01T03:01:00Z", 1.0)
                   + finished("b", "j", "succeeded", "2026-11-01T03:11:00Z", 1.0))
    lm.aggregate(engine, [log], now=NOW)
    runs = "hostmeter.job.runs"
    with engine.begin() as conn:
        conn.execute(sa.update(job_metrics).where(job_metrics.c.name == runs)
                     .values(value=Decimal(999)))
    lm.aggregate(engine, [log], now=NOW)  # nothing new: nothing recomputed
    got = points(engine)
    assert got[(runs, "03:00", "j", "succeeded")] == got[(runs, "03:10", "j", "succeeded")] == 999

    with log.open("a") as f:  # a new run in the 03:10 bucket only
        f.write(finished("c", "j", "succeeded", "2026-11-01T03:12:00Z", 1.0))
    lm.aggregate(engine, [log], now=NOW)
    got = points(engine)
    assert got[(runs, "03:00", "j", "succeeded")] == 999  # untouched
    assert got[(runs, "03:10", "j", "succeeded")] == 1000  # "c" added to what was there


@pytest.mark.parametrize("block", [37, 1 << 20], ids=["block-shorter-than-a-line",
                                                     "many-batches-in-one-block"])
def test_a_file_is_read_in_blocks_with_the_same_result(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    """Blocks far shorter than a line, or one block holding many batches of runs: every line
    read once, whole, and every run stored."""
    lines = history(120, seed=11)
    log = tmp_path / "hostmeter.jsonl"
    log.write_text("".join(lines))
    monkeypatch.setattr(lm, "READ_BLOCK", block)
    monkeypatch.setattr(lm, "RUN_BATCH", 16)
    out = lm.aggregate(engine, [log], now=NOW)
    assert out.runs == 120
    assert out.lines == len(lines) and out.malformed == 3
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.sum(job_metrics.c.value)).where(
            job_metrics.c.name == "hostmeter.job.runs")).scalar_one()
    assert total == 120


def passes_at_once(db_url: str, log: Path, count: int = 2) -> list[lm.AggregateResult]:
    """``count`` log passes over ``log`` started together (threads, an engine each); their
    results, after every one has ended without an error."""
    engines = [db.create_engine(db_url) for _ in range(count)]
    barrier = threading.Barrier(count)
    results: list[lm.AggregateResult] = []
    errors: list[BaseException] = []

    def one(e: Engine) -> None:
        try:
            barrier.wait()
            results.append(lm.aggregate(e, [log], now=NOW))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for e in engines:
        e.dispose()
    assert not errors, errors
    assert len(results) == count
    return results


def test_two_passes_at_once_count_every_line_once(engine: Engine, db_url: str,
                                                  tmp_path: Path) -> None:
    """Two passes started together over the same new lines: runs and malformed lines are
    counted once between them (the malformed counter is a sum, so a line read by both passes
    would count twice)."""
    log = tmp_path / "hostmeter.jsonl"
    log.write_text("".join(history(400, seed=5)))
    results = passes_at_once(db_url, log)
    assert sorted(r.runs for r in results) == [0, 400]
    assert sorted(r.malformed for r in results) == [0, 8]
    with engine.connect() as conn:
        malformed = conn.execute(sa.select(sa.func.sum(job_metrics.c.value)).where(
            job_metrics.c.name == lm.MALFORMED)).scalar_one()
    assert malformed == 8
