"""SQL of the billing package: month sums from snapshots, invoices in and out.

Reads are set-based (one statement for all tenants of a period, not a query per tenant), and so
are writes: :func:`write_revisions` writes any number of tenants' revisions with a fixed number of
statements. Every write happens in the caller's transaction, so a failure leaves no half-written
tenant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from billing import models as b
from billing.errors import InvoiceImmutable, UnknownTenant
from billing.rules import MonthSums, Rating
from metering import models as m
from metering.db import bulk_insert
from metering.display import quote_name

__all__ = [
    "FinalizedInvoice",
    "RevisionWrite",
    "StoredInvoice",
    "finalize_drafts",
    "insert_revision",
    "load_invoices",
    "month_sums",
    "month_sums_statements",
    "resolve_tenants",
    "void_invoice",
    "void_invoices",
    "write_revisions",
]


_NAMES_SHOWN = 10  # unknown keys named in the error; the rest are counted


def resolve_tenants(conn: Connection, keys: Sequence[str]) -> dict[str, int]:
    """Tenant keys → ids; an unknown key raises :class:`UnknownTenant`."""
    if not keys:
        return {}
    t = m.tenants
    found = dict(conn.execute(sa.select(t.c.key, t.c.id).where(t.c.key.in_(list(keys)))).all())
    unknown = sorted(set(keys) - set(found))
    if unknown:
        shown = ", ".join(quote_name(k) for k in unknown[:_NAMES_SHOWN])
        more = f" and {len(unknown) - _NAMES_SHOWN} more" if len(unknown) > _NAMES_SHOWN else ""
        raise UnknownTenant(f"unknown tenant(s): {shown}{more} (tenant keys are exact and "
                            "case-sensitive)", tenants=unknown)
    return found


def month_sums_statements(
    start: datetime, end: datetime, tenant_ids: Sequence[int] | None = None
) -> tuple[sa.Select[Any], sa.Select[Any]]:
    """The two statements :func:`month_sums` runs.

    The first reads the month of ``usage_snapshots`` once, grouped by tenant **and plan**:
    plain sums (and the most hosts in an hour) per plan, which :func:`month_sums` then picks
    from (the ``standard`` row is the paid hours; the ``free`` row gives the free-plan peak).
    That is a few rows per tenant and no per-row ``CASE``, measurably cheaper than summing
    conditionally. The tenants' keys are joined after grouping. The second sums the
    anomaly-detection roles over the paid hours, per tenant and role.
    """
    us, ur, t = m.usage_snapshots, m.usage_snapshot_roles, m.tenants
    where = [us.c.hour >= start, us.c.hour < end]
    if tenant_ids is not None:
        where.append(us.c.tenant_id.in_(list(tenant_ids)))
    per_plan = (
        sa.select(
            us.c.tenant_id,
            us.c.plan,
            sa.func.count().label("hours"),
            sa.func.sum(us.c.standard_hosts).label("standard_hosts"),
            sa.func.sum(us.c.micro_hosts).label("micro_hosts"),
            sa.func.sum(us.c.standard_overage).label("standard_overage"),
            sa.func.sum(us.c.micro_overage).label("micro_overage"),
            sa.func.sum(us.c.service_metrics).label("service_metrics"),
            sa.func.sum(us.c.monitors).label("monitors"),
            sa.func.max(us.c.standard_hosts + us.c.micro_hosts).label("max_hosts"),
        )
        .where(*where)
        .group_by(us.c.tenant_id, us.c.plan)
        .subquery("per_plan")
    )
    sums = sa.select(t.c.key, *[c for c in per_plan.c if c.name != "tenant_id"]).join(
        per_plan, per_plan.c.tenant_id == t.c.id)

    role_where = [ur.c.hour >= start, ur.c.hour < end, us.c.plan == "standard"]
    if tenant_ids is not None:
        role_where.append(ur.c.tenant_id.in_(list(tenant_ids)))
    per_role = (
        sa.select(ur.c.tenant_id, ur.c.role, sa.func.sum(ur.c.hosts).label("hosts"))
        .join(us, sa.and_(us.c.tenant_id == ur.c.tenant_id, us.c.hour == ur.c.hour))
        .where(*role_where)
        .group_by(ur.c.tenant_id, ur.c.role)
        .subquery("per_role")
    )
    roles = sa.select(t.c.key, per_role.c.role, per_role.c.hosts).join(
        per_role, per_role.c.tenant_id == t.c.id)
    return sums, roles


def month_sums(
    conn: Connection,
    start: datetime,
    end: datetime,
    hours_in_month: int,
    tenant_ids: Sequence[int] | None = None,
) -> dict[str, MonthSums]:
    """Every tenant's quantities summed over the paid hours of ``[start, end)``: two statements
    (:func:`month_sums_statements`). Only ``standard`` hours are paid; tenants with no paid hour
    have ``paid_hours == 0`` (and their free-plan peak)."""
    sums, role_sums = month_sums_statements(start, end, tenant_ids)
    roles: dict[str, list[tuple[str, int]]] = {}
    for key, role, total in conn.execute(role_sums):
        roles.setdefault(key, []).append((role, int(total)))
    paid: dict[str, tuple[int, ...]] = {}
    free_max: dict[str, int] = {}
    for key, plan, hours, s, u, os_, ou, sm, x, max_hosts in conn.execute(sums):
        if plan == "standard":
            paid[key] = (int(hours), int(s), int(u), int(os_), int(ou), int(sm), int(x))
        else:
            paid.setdefault(key, (0,) * 7)
            if plan == "free":
                free_max[key] = int(max_hosts)
    return {
        key: MonthSums(
            tenant=key, hours_in_month=hours_in_month, paid_hours=p[0], standard_hosts=p[1],
            micro_hosts=p[2], standard_overage=p[3], micro_overage=p[4], service_metrics=p[5],
            monitors=p[6], roles=tuple(sorted(roles.get(key, []))),
            free_max_hosts=free_max.get(key, 0),
        )
        for key, p in paid.items()
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredInvoice:
    """One stored revision with its lines and adjustments."""

    id: int
    tenant: str
    period: str
    revision: int
    status: str
    currency: str
    minor_units: int
    catalog_version: str
    standard_units: int
    micro_units: int
    subtotal: int
    tax: int
    total: int
    content_hash: str
    created_at: datetime
    created_by: str
    reason: str | None
    finalized_at: datetime | None
    lines: tuple[dict[str, Any], ...] = ()
    adjustments: tuple[dict[str, Any], ...] = ()


def load_invoices(
    conn: Connection, period: str, tenant_ids: Sequence[int] | None = None, *,
    details: bool = True,
) -> dict[str, list[StoredInvoice]]:
    """Every revision of ``period`` (oldest first per tenant), with lines and adjustments:
    three statements for all tenants. ``details=False`` reads the invoice rows only (one
    statement): what a close compares (content hash, units, totals) is all there."""
    inv, ln, adj, t = b.invoices, b.invoice_lines, b.invoice_adjustments, m.tenants
    where = [inv.c.period == period]
    if tenant_ids is not None:
        where.append(inv.c.tenant_id.in_(list(tenant_ids)))
    rows = conn.execute(
        sa.select(inv, t.c.key.label("tenant"))
        .join(t, t.c.id == inv.c.tenant_id)
        .where(*where)
        .order_by(t.c.key, inv.c.revision)
    ).mappings().all()
    ids = [r["id"] for r in rows]
    lines: dict[int, list[dict[str, Any]]] = {}
    adjustments: dict[int, list[dict[str, Any]]] = {}
    if ids and details:
        sel = sa.select(inv.c.id).where(*where).scalar_subquery()
        for r in conn.execute(
            sa.select(ln).where(ln.c.invoice_id.in_(sel)).order_by(ln.c.invoice_id, ln.c.position)
        ).mappings():
            lines.setdefault(r["invoice_id"], []).append(dict(r))
        target = inv.alias("target")
        for r in conn.execute(
            sa.select(adj, target.c.revision.label("adjusts_revision"))
            .join(target, target.c.id == adj.c.adjusts_invoice_id)
            .where(adj.c.invoice_id.in_(sel))
            .order_by(adj.c.id)
        ).mappings():
            adjustments.setdefault(r["invoice_id"], []).append(dict(r))
    out: dict[str, list[StoredInvoice]] = {}
    for r in rows:
        out.setdefault(r["tenant"], []).append(
            StoredInvoice(
                id=r["id"], tenant=r["tenant"], period=r["period"], revision=r["revision"],
                status=r["status"], currency=r["currency"], minor_units=r["minor_units"],
                catalog_version=r["catalog_version"], standard_units=r["standard_units"],
                micro_units=r["micro_units"], subtotal=r["subtotal"], tax=r["tax"],
                total=r["total"], content_hash=r["content_hash"], created_at=r["created_at"],
                created_by=r["created_by"], reason=r["reason"], finalized_at=r["finalized_at"],
                lines=tuple(lines.get(r["id"], [])),
                adjustments=tuple(adjustments.get(r["id"], [])),
            )
        )
    return out


def insert_revision(
    conn: Connection,
    *,
    tenant_id: int,
    period: str,
    revision: int,
    rating: Rating,
    created_at: datetime,
    created_by: str,
    run_id: str,
    reason: str | None,
    adjusts: StoredInvoice | None = None,
) -> int:
    """Write a new draft revision (and its adjustment against ``adjusts``, a final revision)."""
    inv = b.invoices
    invoice_id = conn.execute(
        sa.insert(inv)
        .values(
            tenant_id=tenant_id, period=period, revision=revision, status="draft",
            currency=rating.currency, minor_units=rating.minor_units,
            catalog_version=rating.catalog_version, standard_units=rating.standard_units,
            micro_units=rating.micro_units, subtotal=rating.subtotal, tax=rating.tax,
            total=rating.total, content_hash=rating.content_hash, created_at=created_at,
            created_by=created_by, run_id=run_id, reason=reason,
        )
        .returning(inv.c.id)
    ).scalar_one()
    if rating.lines:
        conn.execute(
            sa.insert(b.invoice_lines),
            [
                {"invoice_id": invoice_id, "position": i, "item": ln.item, "unit": ln.unit,
                 "units": ln.units, "unit_price": ln.unit_price, "amount": ln.amount,
                 "basis": ln.basis}
                for i, ln in enumerate(rating.lines, start=1)
            ],
        )
    if adjusts is not None:
        conn.execute(
            sa.insert(b.invoice_adjustments).values(
                invoice_id=invoice_id,
                adjusts_invoice_id=adjusts.id,
                standard_units=rating.standard_units - adjusts.standard_units,
                micro_units=rating.micro_units - adjusts.micro_units,
                tax=rating.tax - adjusts.tax,
                amount=rating.total - adjusts.total,
                reason=reason or "",
                created_at=created_at,
                created_by=created_by,
            )
        )
    return int(invoice_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class RevisionWrite:
    """What a close or rerun writes for one tenant: void its current draft (``void``), then add
    a new draft revision (``rating``, with an adjustment against ``adjusts``, a final revision).
    Either part may be absent: a restored tenant only voids (``adjusts`` then names the final
    revision that stands again, for its event), a new tenant only inserts."""

    tenant: str
    tenant_id: int
    revision: int
    rating: Rating | None = None
    void: StoredInvoice | None = None
    adjusts: StoredInvoice | None = None
    reason: str | None = None


_IDS_PER_STATEMENT = 5000  # bound parameters per IN list (SQLite allows 32,766)
_SMALL_GROUP = 100


def write_revisions(
    conn: Connection,
    writes: Sequence[RevisionWrite],
    *,
    period: str,
    created_at: datetime,
    created_by: str,
    run_id: str,
) -> None:
    """Write many tenants' revisions of ``period`` at once, in the caller's transaction.

    A fixed number of statements whatever the number of tenants: one ``UPDATE`` voids the
    drafts being replaced, the invoices go in as one bulk insert (``COPY`` on PostgreSQL, an
    ``executemany`` on SQLite), one ``SELECT`` reads their ids back (by ``run_id``), then the
    lines go in the same way and the adjustments as one ``executemany``. Any failure raises and
    leaves the caller to roll back (:func:`billing.service` retries smaller groups, down to one
    tenant, each in a savepoint). The database triggers still guard every row: a final or void
    invoice is never changed.
    """
    voids = [w.void for w in writes if w.void is not None]
    void_invoices(conn, voids, created_at)
    new = [w for w in writes if w.rating is not None]
    if not new:
        return
    inv = b.invoices
    bulk_insert(conn, inv, [
        {"tenant_id": w.tenant_id, "period": period, "revision": w.revision, "status": "draft",
         "currency": r.currency, "minor_units": r.minor_units,
         "catalog_version": r.catalog_version, "standard_units": r.standard_units,
         "micro_units": r.micro_units, "subtotal": r.subtotal, "tax": r.tax, "total": r.total,
         "content_hash": r.content_hash, "created_at": created_at, "created_by": created_by,
         "run_id": run_id, "reason": w.reason}
        for w in new if (r := w.rating) is not None
    ])
    where = [inv.c.period == period, inv.c.run_id == run_id]
    if len(new) <= _SMALL_GROUP:  # a retry group: read back only its own rows
        where.append(inv.c.tenant_id.in_([w.tenant_id for w in new]))
    ids = {(tid, rev): iid for tid, rev, iid in conn.execute(
        sa.select(inv.c.tenant_id, inv.c.revision, inv.c.id).where(*where))}
    bulk_insert(conn, b.invoice_lines, [
        {"invoice_id": ids[w.tenant_id, w.revision], "position": i, "item": ln.item,
         "unit": ln.unit, "units": ln.units, "unit_price": ln.unit_price, "amount": ln.amount,
         "basis": ln.basis}
        for w in new if w.rating is not None
        for i, ln in enumerate(w.rating.lines, start=1)
    ])
    adjustments = [
        {"invoice_id": ids[w.tenant_id, w.revision], "adjusts_invoice_id": a.id,
         "standard_units": r.standard_units - a.standard_units,
         "micro_units": r.micro_units - a.micro_units, "tax": r.tax - a.tax,
         "amount": r.total - a.total, "reason": w.reason or "", "created_at": created_at,
         "created_by": created_by}
        for w in new if (a := w.adjusts) is not None and (r := w.rating) is not None
    ]
    if adjustments:
        conn.execute(sa.insert(b.invoice_adjustments), adjustments)


def void_invoices(conn: Connection, invoices: Sequence[StoredInvoice], at: datetime) -> None:
    """draft → void for many drafts (one ``UPDATE`` per few thousand). Refuses anything but a
    draft, and raises if any of them stopped being a draft in the meantime."""
    for invoice in invoices:
        if invoice.status != "draft":
            raise InvoiceImmutable(
                f"invoice {invoice.tenant} {invoice.period} revision {invoice.revision} is "
                f"{invoice.status}; only a draft can be voided",
                tenant=invoice.tenant, period=invoice.period, revision=invoice.revision,
            )
    inv = b.invoices
    for i in range(0, len(invoices), _IDS_PER_STATEMENT):
        chunk = invoices[i : i + _IDS_PER_STATEMENT]
        done = conn.execute(
            sa.update(inv)
            .where(inv.c.id.in_([v.id for v in chunk]), inv.c.status == "draft")
            .values(status="void", voided_at=at)
        ).rowcount
        if done != len(chunk):
            raise InvoiceImmutable(
                f"{len(chunk) - done} invoice(s) of {chunk[0].period} changed under us (no "
                "longer a draft)", period=chunk[0].period,
            )


def void_invoice(conn: Connection, invoice: StoredInvoice, at: datetime) -> None:
    """draft → void. Refuses anything but a draft (final invoices are immutable)."""
    void_invoices(conn, [invoice], at)


@dataclass(frozen=True, slots=True, kw_only=True)
class FinalizedInvoice:
    """A draft that :func:`finalize_drafts` has just made final (what its event says)."""

    tenant: str
    tenant_id: int
    revision: int
    currency: str
    minor_units: int
    standard_units: int
    micro_units: int
    subtotal: int
    tax: int
    total: int


def finalize_drafts(
    conn: Connection, period: str, at: datetime, tenant_ids: Sequence[int] | None = None
) -> list[FinalizedInvoice]:
    """draft → final for every current draft of ``period``: one ``UPDATE … RETURNING``, then
    one read of the tenants' keys. Returns the invoices it finalized, by tenant key."""
    inv, t = b.invoices, m.tenants
    where = [inv.c.period == period, inv.c.status == "draft"]
    if tenant_ids is not None:
        where.append(inv.c.tenant_id.in_(list(tenant_ids)))
    rows = conn.execute(
        sa.update(inv).where(*where).values(status="final", finalized_at=at)
        .returning(inv.c.tenant_id, inv.c.revision, inv.c.currency, inv.c.minor_units,
                   inv.c.standard_units, inv.c.micro_units, inv.c.subtotal, inv.c.tax,
                   inv.c.total)
    ).all()
    if not rows:
        return []
    ids = sorted({r.tenant_id for r in rows})
    keys: dict[int, str] = {}
    for i in range(0, len(ids), _IDS_PER_STATEMENT):
        keys.update((tid, key) for tid, key in conn.execute(sa.select(t.c.id, t.c.key).where(
            t.c.id.in_(ids[i : i + _IDS_PER_STATEMENT]))))
    return sorted(
        (FinalizedInvoice(tenant=keys[r.tenant_id], tenant_id=r.tenant_id, revision=r.revision,
                          currency=r.currency, minor_units=r.minor_units,
                          standard_units=r.standard_units, micro_units=r.micro_units,
                          subtotal=r.subtotal, tax=r.tax, total=r.total)
         for r in rows),
        key=lambda f: f.tenant,
    )


def update_invoice(conn: Connection, invoice: StoredInvoice, **values: Any) -> None:
    """Change a draft's stored fields. A final or void invoice raises :class:`InvoiceImmutable`
    (and the database triggers refuse it too)."""
    if invoice.status != "draft":
        raise InvoiceImmutable(
            f"invoice {invoice.tenant} {invoice.period} revision {invoice.revision} is "
            f"{invoice.status} and cannot be changed: rerun the period to write a new revision "
            "with an adjustment",
            tenant=invoice.tenant, period=invoice.period, revision=invoice.revision,
        )
    inv = b.invoices
    conn.execute(sa.update(inv).where(inv.c.id == invoice.id).values(**values))
