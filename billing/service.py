"""Closing, rerunning and finalizing a billing period: load → compute → persist.

- :func:`close_period` makes sure every hour of the month is snapshotted (rebuilding missing
  hours from recorded usage, failing with the list of hours it cannot rebuild), reads the month's
  snapshots with two set-based statements, rates every tenant with a paid hour and writes revision
  1 as a draft for each tenant that has no invoice yet. Closing twice writes nothing.
- :func:`rerun_period` re-snapshots the whole month from recorded usage (except hours whose raw
  usage ``prune-usage`` has deleted: their snapshots are final), recomputes and, per
  tenant: unchanged → nothing; changed draft → revision n+1 (draft) and n becomes void; changed
  final → the final stays untouched, a new draft revision carries an adjustment (the signed
  difference against the final). Adjusting a final needs a reason (blank text is none); a rerun
  refused for want of one writes nothing, not even the re-snapshotted hours, and a dry run
  needs none.
- :func:`finalize_period` turns every current draft of the period final.

The work reads as load → compute → persist: the month's sums for every tenant come from two
set-based statements, every tenant is rated in memory (:mod:`billing.rules`), and every invoice,
line and adjustment is written in bulk (:func:`billing.repository.write_revisions`, a fixed
number of statements whatever the number of tenants). One tenant failing — in its rating or in
the database — is recorded and the others go on: a failed bulk write is retried in halves, each
in its own savepoint, down to the single tenant that fails. The run then ends ``partial`` and
running it again finishes the rest without duplicating anything.

Every invoice change a customer can see also writes its event to the webhook outbox in the
same transaction (:mod:`billing.invoice_events`): ``invoice.drafted``, ``invoice.revised``,
``invoice.finalized``. Unchanged, stale and failed tenants write none.

``dry_run`` does all the work inside a transaction that is rolled back, so it writes
nothing at all — not even the rebuilt snapshots or the audit row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from billing import models as bm
from billing import outbox
from billing import repository as repo
from billing.catalog import Catalog, catalog_for
from billing.errors import CoverageError, ReasonRequired
from billing.invoice_events import finalized_events, written_events
from billing.rules import MonthSums, Rating, rate
from metering import models as m
from metering.db import describe_error
from metering.retention import frozen_hours
from metering.snapshot import MetricLimits, missing_hours, snapshot_hours
from metering.timeutil import HOUR, hours_between, month_bounds

__all__ = [
    "BillingOutcome",
    "BillingRequest",
    "TenantOutcome",
    "close_period",
    "finalize_period",
    "limits_for",
    "rerun_period",
]

log = structlog.get_logger("hostmeter.billing")

RateFn = Callable[[MonthSums, Catalog], Rating]


def limits_for(catalog: Catalog) -> MetricLimits:
    """The per-host metric limits a snapshot uses under ``catalog``."""
    return MetricLimits(standard=catalog.standard_host_metrics, micro=catalog.micro_host_metrics)


@dataclass(frozen=True, slots=True, kw_only=True)
class BillingRequest:
    """Who asks for what. ``logical_time`` bounds which hours may be rebuilt (no clock reads)."""

    period: str
    zone: ZoneInfo
    logical_time: datetime
    actor: str
    run_id: str
    now: datetime
    tenants: tuple[str, ...] = ()
    dry_run: bool = False
    reason: str | None = None
    """Why a final invoice is adjusted. Blank text is no reason: it is stored as ``None``."""
    owns: Callable[[str], bool] | None = None
    """A shard's share of the tenants (``None``: all of them)."""

    def __post_init__(self) -> None:
        if self.reason is not None and not self.reason.strip():
            object.__setattr__(self, "reason", None)
        elif self.reason is not None:
            object.__setattr__(self, "reason", self.reason.strip())


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantOutcome:
    """What happened (or, in a dry run, would happen) to one tenant's invoice."""

    tenant: str
    action: str
    """created | revised | adjusted | restored | unchanged | stale | failed"""
    revision: int | None = None
    old: dict[str, Any] | None = None
    new: dict[str, Any] | None = None
    adjustment: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BillingOutcome:
    """The result of one close / rerun / finalize."""

    period: str
    action: str
    dry_run: bool
    run_id: str
    catalog: str
    hours_in_month: int
    rebuilt_hours: int = 0
    tenants: tuple[TenantOutcome, ...] = ()
    free_over_limit: tuple[tuple[str, int], ...] = ()
    finalized: int = 0

    @property
    def failed(self) -> list[TenantOutcome]:
        return [t for t in self.tenants if t.action == "failed"]

    @property
    def status(self) -> str:
        return "partial" if self.failed else "succeeded"

    def count(self, action: str) -> int:
        return sum(1 for t in self.tenants if t.action == action)

    def counts(self) -> dict[str, Any]:
        return {
            "tenants_expected": len(self.tenants),
            "tenants_processed": len(self.tenants) - len(self.failed),
            "tenants_failed": len(self.failed),
            "invoices_written": sum(
                self.count(a) for a in ("created", "revised", "adjusted")
            ),
            "unchanged": self.count("unchanged"),
            "stale": self.count("stale"),
            "rebuilt_hours": self.rebuilt_hours,
            "free_over_limit": len(self.free_over_limit),
            "finalized": self.finalized,
            # What this run billed (the new revisions it wrote), for the job metrics.
            "billed_standard_units": sum(new["standard_units"] for new in self._written()),
            "billed_micro_units": sum(new["micro_units"] for new in self._written()),
            "billed_amount": sum(new["total"] for new in self._written()),
        }

    def _written(self) -> list[dict[str, Any]]:
        return [t.new for t in self.tenants
                if t.action in ("created", "revised", "adjusted") and t.new is not None]


def _summary(r: Rating | repo.StoredInvoice) -> dict[str, Any]:
    return {"standard_units": r.standard_units, "micro_units": r.micro_units,
            "total": r.total, "tax": r.tax}


def _ranges(hours: Sequence[datetime]) -> str:
    """Compress hours into ``a … b`` ranges for a one-line message."""
    parts: list[str] = []
    start = prev = None
    for h in hours:
        if start is None:
            start = prev = h
        elif prev is not None and h == prev + HOUR:
            prev = h
        else:
            parts.append(_one_range(start, prev))
            start = prev = h
    if start is not None:
        parts.append(_one_range(start, prev))
    text = ", ".join(parts[:5])
    return text + (f" (+{len(parts) - 5} more ranges)" if len(parts) > 5 else "")


def _one_range(a: datetime, b: datetime | None) -> str:
    if b is None or a == b:
        return a.isoformat()
    return f"{a.isoformat()}…{b.isoformat()}"


@contextmanager
def _transaction(engine: Engine, dry_run: bool) -> Iterator[Connection]:
    """A transaction that commits, or — in a dry run — always rolls back."""
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            yield conn
        except BaseException:
            trans.rollback()
            raise
        if dry_run:
            trans.rollback()
        else:
            trans.commit()


def _rebuild(
    conn: Connection, req: BillingRequest, catalog: Catalog, *, everything: bool
) -> int:
    """Snapshot the month's missing hours (or all of them); refuse hours not over yet."""
    start, end = month_bounds(req.period, req.zone)
    todo = list(hours_between(start, end)) if everything else missing_hours(conn, start, end)
    frozen = frozen_hours(conn, todo)  # raw usage pruned: the snapshot is all there is
    todo = [h for h in todo if h not in frozen]
    not_over = [h for h in todo if h + HOUR > req.logical_time]
    if not_over:
        raise CoverageError(
            f"{len(not_over)} hour(s) of {req.period} cannot be rebuilt because they are not "
            f"over yet at {req.logical_time.isoformat()}: {_ranges(not_over)}",
            period=req.period, hours=[h.isoformat() for h in not_over],
        )
    limits = limits_for(catalog)
    for i in range(0, len(todo), 24):
        snapshot_hours(conn, todo[i : i + 24], limits=limits, run_id=req.run_id,
                       snapshotted_at=req.now)
    if todo:
        log.info("hours_rebuilt", period=req.period, hours=len(todo))
    return len(todo)


BILLING_LOCK_KEY = 0x686D5F62  # "hm_b"


def _lock_period(conn: Connection, period: str) -> None:
    """One writer of a period's invoices at a time (PostgreSQL; SQLite's BEGIN IMMEDIATE
    already serialises writers), so two closes at once cannot both write revision 1."""
    if conn.dialect.name == "postgresql":
        year, month = period.split("-")
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k, :p)"),
                     {"k": BILLING_LOCK_KEY, "p": int(year) * 12 + int(month)})


def _bill(
    conn: Connection,
    req: BillingRequest,
    catalog: Catalog,
    *,
    action: str,
    rebuilt: int,
    rate_fn: RateFn,
) -> BillingOutcome:
    _lock_period(conn, req.period)
    start, end = month_bounds(req.period, req.zone)
    n = int((end - start) / HOUR)
    tenant_ids = repo.resolve_tenants(conn, req.tenants) if req.tenants else None
    ids = list(tenant_ids.values()) if tenant_ids is not None else None
    sums = repo.month_sums(conn, start, end, n, ids)
    existing = repo.load_invoices(conn, req.period, ids, details=False)
    if tenant_ids is None:
        key_to_id = dict(conn.execute(sa.select(m.tenants.c.key, m.tenants.c.id)).all())
    else:
        key_to_id = tenant_ids

    free = tuple(sorted(
        (k, s.free_max_hosts) for k, s in sums.items()
        if s.free_max_hosts > catalog.free_plan_hosts
    ))
    candidates = sorted({k for k, s in sums.items() if s.paid_hours > 0} | set(existing))
    if req.owns is not None:
        candidates = [k for k in candidates if req.owns(k)]
        free = tuple((k, h) for k, h in free if req.owns(k))
    for tenant, hosts in free:
        log.warning("free_tenant_over_limit", tenant=tenant, hosts=hosts,
                    limit=catalog.free_plan_hosts, period=req.period)

    # Compute: every tenant rated and its write decided, in memory.
    outcomes: dict[str, TenantOutcome] = {}
    writes: list[repo.RevisionWrite] = []
    for tenant in candidates:
        month = sums.get(tenant) or MonthSums(tenant=tenant, hours_in_month=n, paid_hours=0)
        try:
            outcome, write = _plan_tenant(
                req, catalog, month, existing.get(tenant, []), tenant_id=key_to_id[tenant],
                allow_revise=action == "rerun", rate_fn=rate_fn,
            )
        except ReasonRequired:
            raise
        except Exception as exc:
            outcome, write = _failed(conn, req, tenant, exc), None
        outcomes[tenant] = outcome
        if write is not None:
            writes.append(write)

    # Persist: all of it in bulk; a failing tenant is found and left out (_write_isolated).
    failed: set[str] = set()
    for tenant, error in _write_isolated(conn, req, writes):
        outcomes[tenant] = _failed(conn, req, tenant, error)
        failed.add(tenant)
    # What customers hear (webhooks): written in this transaction, so it commits with the
    # invoices or not at all; a dry run writes none.
    if not req.dry_run:
        outbox.enqueue(conn, written_events([w for w in writes if w.tenant not in failed],
                                            period=req.period, action=action),
                       now=req.now, run_id=req.run_id)

    # One event per tenant whose invoice a customer has seen change (revised, adjusted,
    # restored); the routine first revisions — one per paying tenant, thousands a month — are
    # counted in one event.
    written: dict[str, int] = {}
    for outcome in outcomes.values():
        if outcome.action in ("created", "revised", "adjusted", "restored"):
            written[outcome.action] = written.get(outcome.action, 0) + 1
            if outcome.action != "created":
                log.info("invoice_written", tenant=outcome.tenant, period=req.period,
                         revision=outcome.revision, action=outcome.action,
                         total=outcome.new["total"] if outcome.new else None,
                         dry_run=req.dry_run)
    log.info("period_billed", period=req.period, dry_run=req.dry_run, **written)

    result = BillingOutcome(
        period=req.period, action=action, dry_run=req.dry_run, run_id=req.run_id,
        catalog=catalog.version, hours_in_month=n, rebuilt_hours=rebuilt,
        tenants=tuple(outcomes.values()), free_over_limit=free,
    )
    _audit(conn, req, catalog, result)
    return result


def _failed(conn: Connection, req: BillingRequest, tenant: str, exc: Exception) -> TenantOutcome:
    outcome = TenantOutcome(tenant=tenant, action="failed",
                            error=describe_error(exc, url=conn.engine.url))
    log.error("tenant_failed", tenant=tenant, period=req.period, error=outcome.error)
    return outcome


def _write_isolated(
    conn: Connection, req: BillingRequest, writes: list[repo.RevisionWrite]
) -> list[tuple[str, Exception]]:
    """Write every tenant's revision in one savepoint with a fixed number of statements; if
    that fails, retry each half in its own savepoint, and so on down to single tenants. The
    tenants that fail alone are returned with their error and leave nothing behind; the rest
    are written. One failing tenant among *n* costs about 2·log₂ *n* savepoints, not *n*.

    A lost connection is no tenant's fault: it is raised at once (the run fails and is
    retried whole)."""
    if not writes:
        return []
    try:
        with conn.begin_nested():
            repo.write_revisions(conn, writes, period=req.period, created_at=req.now,
                                 created_by=req.actor, run_id=req.run_id)
        return []
    except Exception as exc:
        if conn.invalidated or getattr(exc, "connection_invalidated", False):
            raise
        if len(writes) == 1:
            return [(writes[0].tenant, exc)]
    half = len(writes) // 2
    return _write_isolated(conn, req, writes[:half]) + _write_isolated(conn, req, writes[half:])


def _plan_tenant(
    req: BillingRequest,
    catalog: Catalog,
    month: MonthSums,
    revisions: list[repo.StoredInvoice],
    *,
    tenant_id: int,
    allow_revise: bool,
    rate_fn: RateFn,
) -> tuple[TenantOutcome, repo.RevisionWrite | None]:
    """Rate one tenant and decide what to write (nothing is written here)."""
    rating = rate_fn(month, catalog)
    live = [r for r in revisions if r.status != "void"]
    current = live[-1] if live else None
    finals = [r for r in revisions if r.status == "final"]
    last_final = finals[-1] if finals else None
    next_revision = (revisions[-1].revision + 1) if revisions else 1
    new = _summary(rating)

    def write(adjusts: repo.StoredInvoice | None, reason: str | None,
              void: repo.StoredInvoice | None = None) -> repo.RevisionWrite:
        return repo.RevisionWrite(tenant=month.tenant, tenant_id=tenant_id,
                                  revision=next_revision, rating=rating, void=void,
                                  adjusts=adjusts, reason=reason)

    if current is None:
        return (TenantOutcome(tenant=month.tenant, action="created", revision=next_revision,
                              new=new), write(last_final, req.reason))
    old = _summary(current)
    if current.content_hash == rating.content_hash:
        return TenantOutcome(tenant=month.tenant, action="unchanged", revision=current.revision,
                             old=old, new=new), None
    if not allow_revise:
        return TenantOutcome(tenant=month.tenant, action="stale", revision=current.revision,
                             old=old, new=new), None
    if current.status == "draft":
        if last_final is not None and last_final.content_hash == rating.content_hash:
            # The data came back to what the final invoice says: no correction is needed.
            return (TenantOutcome(tenant=month.tenant, action="restored",
                                  revision=last_final.revision, old=old, new=new),
                    repo.RevisionWrite(tenant=month.tenant, tenant_id=tenant_id,
                                       revision=next_revision, void=current,
                                       adjusts=last_final))
        return (TenantOutcome(
            tenant=month.tenant, action="adjusted" if last_final else "revised",
            revision=next_revision, old=old, new=new,
            adjustment=(rating.total - last_final.total) if last_final else None,
        ), write(last_final, req.reason, void=current))
    # current is final: never touched; a new draft revision carries the difference. A dry run
    # shows the adjustment it would write and needs no reason: it writes nothing.
    if not req.reason and not req.dry_run:
        raise ReasonRequired(
            f"tenant {month.tenant}: the final invoice for {req.period} (revision "
            f"{current.revision}) would be adjusted; give --reason",
            tenant=month.tenant, period=req.period,
        )
    return (TenantOutcome(tenant=month.tenant, action="adjusted", revision=next_revision,
                          old=old, new=new, adjustment=rating.total - current.total),
            write(current, req.reason))


def _audit(conn: Connection, req: BillingRequest, catalog: Catalog,
           result: BillingOutcome) -> None:
    conn.execute(
        sa.insert(bm.billing_runs).values(
            run_id=req.run_id, period=req.period, action=result.action, dry_run=req.dry_run,
            catalog_version=catalog.version, started_at=req.now, finished_at=req.now,
            actor=req.actor, reason=req.reason, status=result.status,
            summary={
                **result.counts(),
                "tenants": list(req.tenants),
                "failed": [{"tenant": t.tenant, "error": t.error} for t in result.failed],
                "free_over_limit": [{"tenant": k, "hosts": h} for k, h in result.free_over_limit],
            },
        )
    )


def _run(
    engine: Engine,
    req: BillingRequest,
    *,
    action: str,
    catalogs: Sequence[Catalog] | None,
    rate_fn: RateFn,
) -> BillingOutcome:
    catalog = catalog_for(req.period, catalogs)
    everything = action == "rerun"
    if req.dry_run or action == "rerun":
        # One transaction: a dry run rolls it all back, and a rerun refused (a final invoice
        # to adjust and no reason) leaves the month's snapshots as they were too.
        with _transaction(engine, dry_run=req.dry_run) as conn:
            rebuilt = _rebuild(conn, req, catalog, everything=everything)
            return _bill(conn, req, catalog, action=action, rebuilt=rebuilt, rate_fn=rate_fn)
    with _transaction(engine, dry_run=False) as conn:
        rebuilt = _rebuild(conn, req, catalog, everything=everything)
    with _transaction(engine, dry_run=False) as conn:
        return _bill(conn, req, catalog, action=action, rebuilt=rebuilt, rate_fn=rate_fn)


def close_period(
    engine: Engine, req: BillingRequest, *,
    catalogs: Sequence[Catalog] | None = None, rate_fn: RateFn = rate,
) -> BillingOutcome:
    """Close ``req.period``: draft revision 1 for every paying tenant without an invoice."""
    return _run(engine, req, action="close", catalogs=catalogs, rate_fn=rate_fn)


def rerun_period(
    engine: Engine, req: BillingRequest, *,
    catalogs: Sequence[Catalog] | None = None, rate_fn: RateFn = rate,
) -> BillingOutcome:
    """Re-snapshot the month, recompute, and write revisions/adjustments where content changed."""
    return _run(engine, req, action="rerun", catalogs=catalogs, rate_fn=rate_fn)


def finalize_period(
    engine: Engine, req: BillingRequest, *, catalogs: Sequence[Catalog] | None = None,
) -> BillingOutcome:
    """Make every current draft of the period final (one statement)."""
    catalog = catalog_for(req.period, catalogs)
    with _transaction(engine, dry_run=req.dry_run) as conn:
        _lock_period(conn, req.period)
        ids = list(repo.resolve_tenants(conn, req.tenants).values()) if req.tenants else None
        finalized = repo.finalize_drafts(conn, req.period, req.now, ids)
        count = len(finalized)
        if not req.dry_run:
            outbox.enqueue(conn, finalized_events(finalized, period=req.period), now=req.now,
                           run_id=req.run_id)
        result = BillingOutcome(period=req.period, action="finalize", dry_run=req.dry_run,
                                run_id=req.run_id, catalog=catalog.version, hours_in_month=0,
                                finalized=count)
        _audit(conn, req, catalog, result)
    log.info("invoices_finalized", period=req.period, count=count, dry_run=req.dry_run)
    return result

