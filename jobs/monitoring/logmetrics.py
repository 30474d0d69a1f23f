"""Job logs → job metrics: the ``aggregate-job-logs`` job and the store behind the exporters.

1. **Read incrementally, in a stream.** Each JSON-lines log file is read from its checkpoint
   (``log_checkpoints``, keyed by a hash of the file's first line, with the byte offset) in
   blocks of :data:`READ_BLOCK` bytes, never whole. A file renamed or copied by a rotation goes
   on from its checkpoint; a replaced file (another first line) or a truncated one (shorter
   than the offset) is read from the start; compressed rotations (``.gz`` …) are skipped; an
   unfinished last line is left for the next pass. Lines that are not JSON objects are counted
   as malformed, never fatal. Each line is checked with msgspec, which validates the whole
   line but builds nothing of it; only ``job_finished`` lines are decoded into a dict, and the
   per-item lines into small structs (:mod:`jobs.monitoring.tenants`).
2. **Keep runs.** Every ``job_finished`` event becomes a ``log_runs`` row keyed by its run id,
   so reading the same line twice (after a rotation, say) adds nothing. Rows are written
   :data:`RUN_BATCH` at a time as the stream goes.
3. **Update only what is new.** ``job_metrics`` holds 5-minute buckets: runs by job and
   status, run duration, tenants expected / processed / failed, hosts and metrics counted,
   hours snapshotted, invoices written, billed units and amount, plus the malformed-line
   counter. Each batch of runs that is new to ``log_runs`` (the insert reports which) is added
   to the buckets it falls in — counts and sums added, the longest duration kept — in the
   transaction that stores the runs, so a bucket is the sum of its runs whichever passes read
   them, and a pass that reads nothing new touches nothing, whatever the history.

Checkpoint, runs and metrics of one pass are written in one transaction, and passes take turns
(PostgreSQL: a transaction-scoped advisory lock; SQLite: ``BEGIN IMMEDIATE``), so two passes at
once read each line once between them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from billing import models as bm
from billing.rules import to_decimal
from jobs.monitoring.cloudwatch import (
    CHECKPOINT_HEAD,
    LogGroupBatch,
    checkpoint_key,
    read_log_group,
)
from jobs.monitoring.cloudwatch import logs_client as cloudwatch_client
from jobs.monitoring.metricdata import (
    DashboardData,
    GrowthRanking,
    HourValue,
    JobStatus,
    MetricPoint,
    MonthBilling,
    MonthEstimates,
    NoisyFlag,
    NoisyFlags,
    RunCompleteness,
    RunFact,
    TenantGrowth,
)
from jobs.monitoring.store import job_metrics, log_checkpoints, log_runs
from jobs.monitoring.tenants import EVENTS as TENANT_EVENTS
from jobs.monitoring.tenants import (
    FLAGGED_SERIES,
    FLEET_METRICS,
    TenantEvents,
    latest_hour,
    log_instant,
    log_raised,
    recent_flags,
)
from jobs.monitoring.tenants import growth as tenant_growth
from jobs.runtime.ledger import job_runs
from metering import models as m
from metering.db import bulk_insert, reading, upsert
from metering.report import coverage
from metering.timeutil import month_bounds

__all__ = [
    "BUCKET",
    "AggregateResult",
    "aggregate",
    "capacity",
    "completeness",
    "dashboard_data",
    "file_checkpoint_key",
    "growth_rankings",
    "job_statuses",
    "log_files",
    "month_estimates",
    "months",
    "noisy_flags",
    "parse_lines",
    "read_points",
    "store_log_group",
]

BUCKET = timedelta(minutes=5)
READ_BLOCK = 1 << 20
"""Bytes of a log file read at a time."""
RUN_BATCH = 2_000
"""``log_runs`` rows written at a time."""
AGGREGATE_LOCK_KEY = 0x686D5F616767  # "hm_agg": pg_advisory_xact_lock of one pass
MALFORMED = "hostmeter.logs.malformed_lines"
OVERDUE = "hostmeter.job.runs_overdue"
"""Runs still ``running`` past their ledger deadline, per job, read from the run ledger (not
the logs: a stuck run writes no ``job_finished``) at each pass, for the pass's bucket."""
_STATE_METRICS = (MALFORMED, OVERDUE)  # not derived from runs
_HEAD_BYTES = 256
_HEAD_KEY = "file:"  # log_checkpoints.path of a file: its first line's hash
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
log = structlog.get_logger("hostmeter.metrics")

#: metric name → the ``job_finished`` count it sums (per job and bucket)
COUNT_METRICS = {
    "hostmeter.job.tenants_expected": "tenants_expected",
    "hostmeter.job.tenants_processed": "tenants_processed",
    "hostmeter.job.tenants_failed": "tenants_failed",
    "hostmeter.job.hosts_counted": "host_hours",
    "hostmeter.job.metrics_counted": "host_metrics",
    "hostmeter.job.hours_snapshotted": "hours",
    "hostmeter.billing.invoices_written": "invoices_written",
    "hostmeter.billing.standard_units": "billed_standard_units",
    "hostmeter.billing.micro_units": "billed_micro_units",
    "hostmeter.billing.amount": "billed_amount",
}
_RUN_METRICS = ("hostmeter.job.runs", "hostmeter.job.duration_seconds", *COUNT_METRICS)
_RUN_METRIC_SET = frozenset(_RUN_METRICS)
"""What :func:`_merge_runs` derives from runs (and so updates); the state metrics, the
fleet totals and the noisy-tenant counts are kept."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregateResult:
    """What one pass read and stored."""

    files: int
    lines: int
    log_groups: int = 0
    log_events: int = 0
    runs: int
    malformed: int
    metrics: int
    tenant_items: int = 0
    """Per-item lines (``tenant_hour``, ``tenant_ingested``) read into the tenant series."""
    tenant_hours: int = 0
    """Tenant-hours whose series, fleet totals and flags the pass refreshed."""


def log_files(path: Path) -> list[Path]:
    """A log file, or every ``*.jsonl*`` file in a directory (rotated ones included)."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and ".jsonl" in p.name
                      and not p.name.endswith(_COMPRESSED))
    return [path] if path.is_file() else []


def file_checkpoint_key(path: Path, head: str | None = None) -> str:
    """``log_checkpoints.path`` of a log file: its first line's hash (``head``, if known)."""
    return f"{_HEAD_KEY}{head if head is not None else _head(path)}"


def _head(path: Path) -> str:
    """A hash of the file's first line (at most 256 bytes): stable while the file grows."""
    with path.open("rb") as f:
        first = f.read(_HEAD_BYTES)
    cut = first.find(b"\n")
    return hashlib.sha256(first[: cut + 1] if cut >= 0 else first).hexdigest()


def _floor(at: datetime) -> datetime:
    seconds = int(at.timestamp())
    return datetime.fromtimestamp(seconds - seconds % int(BUCKET.total_seconds()), UTC)


def _run_row(event: dict[str, Any]) -> dict[str, Any] | None:
    finished = log_instant(event.get("timestamp"))
    if not (event.get("event") == "job_finished" and isinstance(event.get("run_id"), str)
            and isinstance(event.get("job"), str) and finished is not None):
        return None
    skip = {"event", "level", "timestamp", "job", "run_id", "logical_time", "status",
            "duration_s", "error"}
    return {
        "run_id": event["run_id"][:64],
        "job": event["job"][:64],
        "status": str(event.get("status", "unknown"))[:16],
        "finished_at": finished,
        "logical_time": log_instant(event.get("logical_time")),
        "duration_s": float(event.get("duration_s") or 0.0),
        "counts": {k: v for k, v in event.items() if k not in skip},
        "error": event.get("error"),
    }


class _Probe(msgspec.Struct):
    """What a log line is checked against: a JSON object (any fields; ``event`` read if it is
    there). Decoding validates the whole line and builds none of its other values."""

    event: Any = None


_probe = msgspec.json.Decoder(_Probe).decode
_object = msgspec.json.Decoder(dict[str, Any]).decode


class _Lines:
    """Counts of the lines a pass has read, and its new ``job_finished`` rows as they come."""

    def __init__(self, sink: Callable[[list[dict[str, Any]]], None] | None = None,
                 items: TenantEvents | None = None) -> None:
        self.lines = 0
        self.malformed = 0
        self.runs: list[dict[str, Any]] = []
        self.sink = sink
        self.items = items

    def feed(self, raw_lines: Iterable[bytes | str]) -> None:
        probe, decode, runs = _probe, _object, self.runs
        for raw in raw_lines:
            if not raw.strip():
                continue
            self.lines += 1
            try:
                event = probe(raw).event
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.malformed += 1
                continue
            if event != "job_finished":
                if event in TENANT_EVENTS and self.items is not None:
                    self.items.feed(event, raw)
                continue
            row = _run_row(decode(raw))
            if row is not None:
                runs.append(row)
                if self.sink is not None and len(runs) >= RUN_BATCH:
                    self.flush()

    def flush(self) -> None:
        if self.sink is not None and self.runs:
            self.sink(list(self.runs))
            self.runs.clear()  # in place: feed() holds this list


def parse_lines(raw_lines: Iterable[bytes | str]) -> tuple[list[dict[str, Any]], int, int]:
    """JSON log lines → (``log_runs`` rows of the ``job_finished`` events, lines, malformed).

    Blank lines are not counted; a line that is not a JSON object is counted as malformed."""
    lines = _Lines()
    lines.feed(raw_lines)
    return lines.runs, lines.lines, lines.malformed


def _complete_lines(f: Any, stop: int) -> Iterator[tuple[list[bytes], int]]:
    """The complete lines of ``f`` from where it stands, a block at a time: (lines, bytes they
    span). An unfinished last line (no newline before ``stop``) is not yielded."""
    rest = b""
    left = stop - f.tell()
    while left > 0:
        block = f.read(min(READ_BLOCK, left))
        if not block:
            break
        left -= len(block)
        data = rest + block
        end = data.rfind(b"\n") + 1
        if end:
            yield data[:end].splitlines(), end
        rest = data[end:]


def _checkpoint(conn: Connection, key: str) -> Any:
    return conn.execute(sa.select(log_checkpoints).where(log_checkpoints.c.path == key)
                        ).mappings().one_or_none()


def _save_checkpoint(conn: Connection, key: str, previous: Any, *, device: int, inode: int,
                     head: str, offset: int, malformed: int, now: datetime) -> None:
    """Move ``key``'s checkpoint to ``offset``, adding ``malformed`` to its running count."""
    upsert(conn, log_checkpoints, [{
        "path": key, "device": device, "inode": inode, "head": head, "offset": offset,
        "malformed": (previous["malformed"] if previous is not None else 0) + malformed,
        "updated_at": now,
    }], key=["path"], update=["device", "inode", "head", "offset", "malformed", "updated_at"])


def _read_new_lines(conn: Connection, path: Path, now: datetime, lines: _Lines) -> None:
    """Feed ``path``'s new complete lines since its checkpoint to ``lines``, then move the
    checkpoint past them (with the malformed lines they held).

    A file is known by its first line (:func:`_head`), not by its name: renamed by a rotation,
    or copied away before being truncated (``copytruncate``), it goes on from its checkpoint
    under any name, and a file that starts over gets a new first line and is read from its
    start. So each line is read once, which the per-tenant sums rely on. (A checkpoint kept by
    path, before this, is taken over once, if the file is still the same.)"""
    st = path.stat()
    head = _head(path)
    key = file_checkpoint_key(path, head)
    cp = _checkpoint(conn, key)
    offset = 0
    if cp is not None:
        offset = cp["offset"] if cp["offset"] <= st.st_size else 0  # shrank: truncated
    else:
        legacy = _checkpoint(conn, str(path.resolve()))
        if legacy is not None and (legacy["device"], legacy["inode"], legacy["head"]) == (
                st.st_dev, st.st_ino, head) and legacy["offset"] <= st.st_size:
            offset = legacy["offset"]
    malformed = lines.malformed
    with path.open("rb") as f:
        f.seek(offset)
        for block, size in _complete_lines(f, st.st_size):
            lines.feed(block)
            offset += size
    _save_checkpoint(conn, key, cp, device=st.st_dev, inode=st.st_ino, head=head,
                     offset=offset, malformed=lines.malformed - malformed, now=now)


def store_log_group(conn: Connection, batch: LogGroupBatch, *, now: datetime,
                    items: TenantEvents | None = None,
                    ) -> tuple[list[dict[str, Any]], int, int] | None:
    """Parse a fetched log-group batch and move its checkpoint → (runs, lines, malformed).
    None, and nothing written, when another pass moved the checkpoint since the batch was
    fetched: that pass stored the same events."""
    key = checkpoint_key(batch.group)
    cp = _checkpoint(conn, key)
    if (None if cp is None else int(cp["offset"])) != batch.since:
        log.warning("log_group_read_concurrently", log_group=batch.group,
                    read_from=batch.since, now_at=cp["offset"] if cp is not None else None)
        return None
    parsed = _Lines(items=items)
    parsed.feed(batch.messages)
    runs, lines, malformed = parsed.runs, parsed.lines, parsed.malformed
    _save_checkpoint(conn, key, cp, device=0, inode=0, head=CHECKPOINT_HEAD,
                     offset=batch.until, malformed=malformed, now=now)
    return runs, lines, malformed


def _insert_runs(conn: Connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert ``log_runs`` rows, keeping a run id already there; returns the rows that were
    new. One statement, executed for all rows at once (compiled once), its ``RETURNING`` naming
    what was inserted."""
    if not rows:
        return []
    from sqlalchemy.dialects import postgresql, sqlite

    dialect: Any = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = (dialect.insert(log_runs).on_conflict_do_nothing(index_elements=["run_id"])
            .returning(log_runs.c.run_id))
    new = set(conn.execute(stmt, rows).scalars())
    return [r for r in rows if r["run_id"] in new]


def _number(value: Any) -> Decimal | None:
    """A count of a ``job_finished`` line as a number (what pandas' ``to_numeric`` took)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = Decimal(str(value).strip())
    except ArithmeticError:
        return None
    return number if number.is_finite() else None


class _Buckets:
    """Per-bucket metrics accumulated from runs (bounded by the buckets one pass touches)."""

    def __init__(self) -> None:
        self.runs: dict[tuple[datetime, str, str], int] = {}
        self.duration: dict[tuple[datetime, str], float] = {}
        self.sums: dict[tuple[str, datetime, str], Decimal] = {}

    def add(self, bucket: datetime, job: str, status: str, duration: float,
            counts: dict[str, Any]) -> None:
        key = (bucket, job, status)
        self.runs[key] = self.runs.get(key, 0) + 1
        jk = (bucket, job)
        self.duration[jk] = max(self.duration.get(jk, duration), duration)
        for name, field in COUNT_METRICS.items():
            value = _number(counts.get(field)) if field in counts else None
            if value is not None:
                sk = (name, bucket, job)
                self.sums[sk] = self.sums.get(sk, Decimal(0)) + value

    def rows(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"name": "hostmeter.job.runs", "bucket": b, "job": j, "status": st,
             "value": Decimal(n)} for (b, j, st), n in self.runs.items()]
        out += [{"name": "hostmeter.job.duration_seconds", "bucket": b, "job": j, "status": "",
                 "value": Decimal(str(round(float(d), 6)))} for (b, j), d in self.duration.items()]
        out += [{"name": n, "bucket": b, "job": j, "status": "", "value": v}
                for (n, b, j), v in self.sums.items()]
        return out


def _spans(buckets: list[datetime]) -> Iterator[tuple[datetime, datetime]]:
    """Sorted buckets as (first, last) ranges, a new range where the next bucket is an hour or
    more away (so a range holds few buckets the batch does not touch)."""
    if not buckets:
        return
    first = prev = buckets[0]
    for b in buckets[1:]:
        if b - prev >= timedelta(hours=1):
            yield first, prev
            first = b
        prev = b
    yield first, prev


def _merge_runs(conn: Connection, runs: list[dict[str, Any]]) -> int:
    """Add newly stored runs to the metrics of their buckets: counts and sums added, the
    longest duration kept, only for the buckets these runs fall in (read back, merged and
    written in a few statements per batch). A run is merged once: only the rows
    :func:`_insert_runs` reports new come here, in the transaction that stores them."""
    if not runs:
        return 0
    acc = _Buckets()
    for r in runs:
        acc.add(_floor(r["finished_at"]), r["job"], r["status"], float(r["duration_s"]),
                r["counts"] or {})
    delta = acc.rows()
    buckets = sorted({r["bucket"] for r in delta})
    wanted = set(buckets)
    old: dict[tuple[str, datetime, str, str], Decimal] = {}
    jm = job_metrics
    for first, last in _spans(buckets):  # range reads: a batch's runs are close in time
        for name, bucket, job, status, value in conn.execute(
                sa.select(jm.c.name, jm.c.bucket, jm.c.job, jm.c.status, jm.c.value)
                .where(jm.c.bucket >= first, jm.c.bucket <= last)):
            if bucket in wanted and name in _RUN_METRIC_SET:
                old[(name, bucket, job, status)] = Decimal(value)
    inserts, updates = [], []
    for r in delta:
        before = old.get((r["name"], r["bucket"], r["job"], r["status"]))
        if before is None:
            inserts.append(r)
        elif r["name"] == "hostmeter.job.duration_seconds":
            if r["value"] > before:
                updates.append({**r, "b_name": r["name"], "b_bucket": r["bucket"],
                                "b_job": r["job"], "b_status": r["status"]})
        else:
            updates.append({**r, "value": before + r["value"], "b_name": r["name"],
                            "b_bucket": r["bucket"], "b_job": r["job"],
                            "b_status": r["status"]})
    if inserts:
        bulk_insert(conn, jm, inserts)  # COPY on PostgreSQL: no row of these keys exists
    if updates:
        conn.execute(sa.update(jm).where(
            jm.c.name == sa.bindparam("b_name"), jm.c.bucket == sa.bindparam("b_bucket"),
            jm.c.job == sa.bindparam("b_job"), jm.c.status == sa.bindparam("b_status"),
        ).values(value=sa.bindparam("value")), updates)
    return len(delta)


def aggregate(engine: Engine, paths: Sequence[Path], *, now: datetime,
              log_groups: Sequence[str] = (), logs_client: Any = None) -> AggregateResult:
    """Read what is new in ``paths`` (files) and ``log_groups`` (CloudWatch Logs, see
    :mod:`jobs.monitoring.cloudwatch`; ``logs_client`` defaults to boto3's) and refresh the stored
    metrics. The log groups are fetched first; everything is stored in one transaction."""
    batches: list[LogGroupBatch] = []
    if log_groups:
        client = logs_client if logs_client is not None else cloudwatch_client()
        with reading(engine) as conn:
            since = {g: _checkpoint(conn, checkpoint_key(g)) for g in log_groups}
        batches = [read_log_group(client, g, since=None if since[g] is None
                                  else int(since[g]["offset"]), now=now) for g in log_groups]
    files = [f for p in paths for f in log_files(p)]
    events = 0
    stored = 0
    inserted = 0
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # one pass at a time (SQLite: BEGIN IMMEDIATE)
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": AGGREGATE_LOCK_KEY})

        def store(rows: list[dict[str, Any]]) -> None:
            nonlocal inserted, stored
            new = _insert_runs(conn, rows)
            inserted += len(new)
            stored += _merge_runs(conn, new)

        items = TenantEvents(conn)
        lines = _Lines(store, items)
        for path in files:
            try:
                _read_new_lines(conn, path, now, lines)
            except OSError as exc:
                log.warning("log_file_unreadable", path=str(path), error=str(exc))
                continue
            lines.flush()
        for batch in batches:
            got = store_log_group(conn, batch, now=now, items=items)
            if got is None:
                continue
            runs, n, malformed = got
            events += batch.events
            lines.lines += n
            lines.malformed += malformed
            store(runs)
        total_lines, total_malformed, total_runs = lines.lines, lines.malformed, inserted
        if total_malformed:
            bucket = _floor(now)
            old = conn.execute(sa.select(job_metrics.c.value).where(
                job_metrics.c.name == MALFORMED, job_metrics.c.bucket == bucket)
            ).scalar_one_or_none() or Decimal(0)
            upsert(conn, job_metrics, [{"name": MALFORMED, "bucket": bucket, "job": "",
                                        "status": "", "value": old + total_malformed}],
                   key=["name", "bucket", "job", "status"], update=["value"])
        overdue = overdue_counts(conn, now)
        if overdue:
            upsert(conn, job_metrics, [
                {"name": OVERDUE, "bucket": _floor(now), "job": job, "status": "",
                 "value": Decimal(count)} for job, count in sorted(overdue.items())],
                key=["name", "bucket", "job", "status"], update=["value"])
        tenant_hours = items.finish()
    log_raised(items.raised)
    log.info("job_logs_aggregated", files=len(files), log_groups=len(batches),
             log_events=events, lines=total_lines, runs=total_runs, malformed=total_malformed,
             metrics=stored, tenant_items=items.events, tenant_hours=tenant_hours)
    return AggregateResult(files=len(files), log_groups=len(batches), log_events=events,
                           lines=total_lines, runs=total_runs, malformed=total_malformed,
                           metrics=stored, tenant_items=items.events, tenant_hours=tenant_hours)


def overdue_counts(conn: Connection, now: datetime) -> dict[str, int]:
    """Per job that has ever run: how many of its runs are ``running`` past their deadline at
    ``now`` (0 for the others, so a graph and an alert see the value fall back)."""
    over = sa.func.sum(sa.case((sa.and_(job_runs.c.status == "running",
                                        job_runs.c.deadline < now), 1), else_=0))
    rows = conn.execute(sa.select(job_runs.c.job, over).group_by(job_runs.c.job)).all()
    return {job: int(n or 0) for job, n in rows}


# --- reading the store ---------------------------------------------------------------------


def read_points(engine: Engine, *, since: datetime | None = None) -> list[MetricPoint]:
    """Stored metric points (oldest first), optionally only buckets after ``since``."""
    q = sa.select(job_metrics).order_by(job_metrics.c.bucket, job_metrics.c.name,
                                        job_metrics.c.job, job_metrics.c.status)
    if since is not None:
        q = q.where(job_metrics.c.bucket > since)
    with reading(engine) as conn:
        rows = conn.execute(q).mappings().all()
    return [
        MetricPoint(name=r["name"], time=r["bucket"], value=Decimal(r["value"]),
                    labels={k: r[k] for k in ("job", "status") if r[k]})
        for r in rows
    ]


def _runs(conn: Connection, limit: int) -> list[RunFact]:
    rows = conn.execute(sa.select(log_runs).order_by(log_runs.c.finished_at.desc())
                        .limit(limit)).mappings().all()
    return [RunFact(run_id=r["run_id"], job=r["job"], status=r["status"],
                    finished_at=r["finished_at"], logical_time=r["logical_time"],
                    duration_s=float(r["duration_s"]), counts=r["counts"] or {},
                    error=r["error"]) for r in reversed(rows)]


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def job_statuses(engine: Engine) -> list[JobStatus]:
    """Per job: last success, last duration and status, runs by status, latest tenant counts."""
    with reading(engine) as conn:
        by_status = conn.execute(
            sa.select(log_runs.c.job, log_runs.c.status, sa.func.count())
            .group_by(log_runs.c.job, log_runs.c.status)).all()
        success = dict(conn.execute(
            sa.select(log_runs.c.job, sa.func.max(log_runs.c.finished_at))
            .where(log_runs.c.status == "succeeded").group_by(log_runs.c.job)).all())
        latest_at = (sa.select(log_runs.c.job, sa.func.max(log_runs.c.finished_at).label("at"))
                     .group_by(log_runs.c.job).subquery())
        latest = {r.job: r for r in conn.execute(
            sa.select(log_runs).join(latest_at, sa.and_(
                latest_at.c.job == log_runs.c.job, latest_at.c.at == log_runs.c.finished_at)))}
    statuses: dict[str, dict[str, int]] = {}
    for job, status, n in by_status:
        statuses.setdefault(job, {})[status] = int(n)
    out = []
    for job in sorted(statuses):
        last = latest.get(job)
        counts = (last.counts or {}) if last is not None else {}
        out.append(JobStatus(
            job=job, last_success=success.get(job),
            last_duration_s=float(last.duration_s) if last is not None else None,
            last_status=last.status if last is not None else None,
            runs_by_status=statuses[job],
            tenants_expected=_int(counts.get("tenants_expected")),
            tenants_processed=_int(counts.get("tenants_processed")),
            tenants_failed=_int(counts.get("tenants_failed")),
        ))
    return out


def _live_revisions() -> sa.Subquery:
    """(tenant_id, period, rev): each invoice's current revision (the latest that is not void)."""
    inv = bm.invoices
    return (sa.select(inv.c.tenant_id, inv.c.period, sa.func.max(inv.c.revision).label("rev"))
            .where(inv.c.status != "void").group_by(inv.c.tenant_id, inv.c.period)
            .subquery("live"))


def months(engine: Engine, zone: Any, *, limit: int = 12) -> list[MonthBilling]:
    """Billed totals of the latest revision of every invoice, and snapshot coverage, per month."""
    inv = bm.invoices
    live = _live_revisions()
    with reading(engine) as conn:
        rows = conn.execute(
            sa.select(inv.c.period, inv.c.currency, inv.c.minor_units, sa.func.count(),
                      sa.func.sum(inv.c.standard_units), sa.func.sum(inv.c.micro_units),
                      sa.func.sum(inv.c.total))
            .join(live, sa.and_(live.c.tenant_id == inv.c.tenant_id,
                                live.c.period == inv.c.period, live.c.rev == inv.c.revision))
            .group_by(inv.c.period, inv.c.currency, inv.c.minor_units)
            .order_by(inv.c.period.desc()).limit(limit)).all()
        out = []
        for period, currency, minor, n, std, micro, total in reversed(rows):
            start, end = month_bounds(period, zone)
            covered = coverage(conn, start, end)
            out.append(MonthBilling(
                period=period, currency=currency, invoices=int(n), standard_units=int(std),
                micro_units=int(micro),
                amount=to_decimal(total, minor),
                covered_hours=int(covered), hours_in_month=int((end - start) / timedelta(hours=1)),
            ))
    return out


def _top_tenants(engine: Engine, period: str, limit: int) -> list[tuple[str, int, Decimal]]:
    inv, t = bm.invoices, m.tenants
    live = _live_revisions()
    with reading(engine) as conn:
        rows = conn.execute(
            sa.select(t.c.key, inv.c.standard_units + inv.c.micro_units, inv.c.total,
                      inv.c.minor_units)
            .join(live, sa.and_(live.c.tenant_id == inv.c.tenant_id,
                                live.c.period == inv.c.period, live.c.rev == inv.c.revision))
            .join(t, t.c.id == inv.c.tenant_id)
            .where(inv.c.period == period)
            .order_by((inv.c.standard_units + inv.c.micro_units).desc(), t.c.key)
            .limit(limit)).all()
    return [(key, int(units), to_decimal(total, minor)) for key, units, total, minor in rows]


def malformed_total(engine: Engine) -> int:
    with reading(engine) as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(
            sa.func.sum(log_checkpoints.c.malformed), 0))).scalar_one())


# The tenant panels read bounded slices of the store, never its whole history: the fleet totals
# of the last CAPACITY_HOURS, two hours of tenant_series, the flags of the last FLAG_DAYS, and
# the runs of the last COMPLETENESS_DAYS.
CAPACITY_HOURS = 14 * 24
"""Hours of fleet totals charted, ending at the newest one stored."""
GROWTH_TOP = 10
"""Tenants ranked per series by growth."""
GROWTH_BASELINE = timedelta(hours=24)
"""Growth is the latest hour's value minus the value this long before (the same hour of the day
before, so the daily cycle of a fleet does not show as growth)."""
FLAG_DAYS = 7
FLAG_ROWS = 50
COMPLETENESS_RUNS = 5
"""Latest runs shown per job."""
COMPLETENESS_DAYS = 35
"""How far back runs are looked for (a monthly job's latest run is in it)."""


def capacity(conn: Connection, *, hours: int = CAPACITY_HOURS) -> dict[str, tuple[HourValue, ...]]:
    """Fleet totals per hour (series → oldest first) over the ``hours`` ending at the newest
    one stored (so a store that stopped being fed still shows where it stopped)."""
    jm = job_metrics
    out: dict[str, tuple[HourValue, ...]] = {}
    for series, name in FLEET_METRICS.items():
        mine = sa.and_(jm.c.name == name, jm.c.job == "", jm.c.status == "")
        newest = conn.execute(sa.select(sa.func.max(jm.c.bucket)).where(mine)).scalar_one()
        if newest is None:
            out[series] = ()
            continue
        rows = conn.execute(sa.select(jm.c.bucket, jm.c.value)
                            .where(mine, jm.c.bucket > newest - timedelta(hours=hours))
                            .order_by(jm.c.bucket)).all()
        out[series] = tuple(HourValue(hour=b, value=int(v)) for b, v in rows)
    return out


def growth_rankings(conn: Connection, *, top: int = GROWTH_TOP) -> list[GrowthRanking]:
    """Per flagged series (hosts, metrics) with data: the ``top`` tenants whose value in the
    series' latest hour grew most over :data:`GROWTH_BASELINE` before (see
    :func:`jobs.monitoring.tenants.growth`)."""
    out = []
    for series in FLAGGED_SERIES:
        hour = latest_hour(conn, series)
        if hour is None:
            continue
        baseline = hour - GROWTH_BASELINE
        rows = tenant_growth(conn, series, hour, baseline, top)
        out.append(GrowthRanking(series=series, hour=hour, baseline=baseline, tenants=tuple(
            TenantGrowth(tenant=t, current=v, previous=p) for t, v, p in rows)))
    return out


def noisy_flags(conn: Connection, *, now: datetime, days: int = FLAG_DAYS,
                limit: int = FLAG_ROWS) -> NoisyFlags:
    """The ``limit`` newest noisy-neighbour flags of the ``days`` before ``now``."""
    since = (now - timedelta(days=days)).astimezone(UTC).replace(minute=0, second=0,
                                                                 microsecond=0)
    rows, total = recent_flags(conn, since=since, limit=limit)
    return NoisyFlags(since=since, total=total, flags=tuple(
        NoisyFlag(series=r["series"], tenant=r["tenant"], hour=r["hour"], value=int(r["value"]),
                  median=Decimal(r["median"])) for r in rows))


def completeness(conn: Connection, *, now: datetime, runs: int = COMPLETENESS_RUNS,
                 days: int = COMPLETENESS_DAYS) -> list[RunCompleteness]:
    """Per job that reports tenant counts: its latest ``runs`` runs (newest first) of the
    ``days`` before ``now`` that reported ``tenants_expected``, jobs by name."""
    r = log_runs
    reported = r.c.counts["tenants_expected"].as_string()  # SQL NULL when absent or null
    rank = sa.func.row_number().over(partition_by=r.c.job,
                                     order_by=(r.c.finished_at.desc(), r.c.run_id.desc()))
    latest = (sa.select(r.c.job, r.c.run_id, r.c.status, r.c.finished_at, r.c.counts,
                        rank.label("rank"))
              .where(r.c.finished_at >= now - timedelta(days=days), reported.is_not(None))
              .subquery())
    rows = conn.execute(sa.select(latest).where(latest.c.rank <= runs)
                        .order_by(latest.c.job, latest.c.rank)).mappings().all()
    out = []
    for row in rows:
        counts = row["counts"] or {}
        out.append(RunCompleteness(
            job=row["job"], run_id=row["run_id"], status=row["status"],
            finished_at=row["finished_at"], expected=_int(counts.get("tenants_expected")),
            processed=_int(counts.get("tenants_processed")),
            failed=_int(counts.get("tenants_failed"))))
    return out


def month_estimates(conn: Connection, zone: Any, *, now: datetime, top: int = 5,
                    tenants: Sequence[str] = ()) -> MonthEstimates | None:
    """The usage estimates stored for the month ``estimate-usage`` estimates at ``now``: the
    fleet's projected total per hour and the ``top`` tenants' (or those of ``tenants``)
    (``None``: none stored)."""
    from billing.estimate import history, period_at

    period = period_at(now, zone)
    stored = history(conn, period=period, top=top, tenants=tenants)
    if stored is None:
        return None
    start, end = month_bounds(period, zone)
    minor = stored.minor_units

    def money(points: Iterable[tuple[datetime, int]]) -> tuple[tuple[datetime, Decimal], ...]:
        return tuple((at, to_decimal(v, minor)) for at, v in points)

    return MonthEstimates(period=period, start=start, end=end, currency=stored.currency,
                          fleet=money(stored.fleet),
                          tenants=tuple((k, money(s)) for k, s in stored.tenants),
                          chosen=bool(tenants))


def dashboard_data(engine: Engine, zone: Any, *, now: datetime, runs: int = 2000,
                   tenants: Sequence[str] = ()) -> DashboardData:
    """Everything the dashboard draws; ``tenants`` picks whose estimates are drawn over the
    month (default: the five largest)."""
    with reading(engine) as conn:
        facts = _runs(conn, runs)
        fleet = capacity(conn)
        ranked = growth_rankings(conn)
        noisy = noisy_flags(conn, now=now)
        complete = completeness(conn, now=now)
        estimates = month_estimates(conn, zone, now=now, tenants=tenants)
    month_list = months(engine, zone)
    top = _top_tenants(engine, month_list[-1].period, 10) if month_list else []
    return DashboardData(generated_at=now, runs=tuple(facts), jobs=tuple(job_statuses(engine)),
                         months=tuple(month_list), top_tenants=tuple(top),
                         malformed_lines=malformed_total(engine), capacity=fleet,
                         growth=tuple(ranked), noisy=noisy, completeness=tuple(complete),
                         estimates=estimates)
