"""SQL of the billing package: month sums from snapshots, invoices in and out.

Reads are set-based (one statement for all tenants of a period, not a query per tenant). Writes
of one tenant's revision happen in the caller's transaction, so a failure leaves no half-written
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
from metering.display import quote_name

__all__ = [
    "StoredInvoice",
    "finalize_drafts",
    "insert_revision",
    "load_invoices",
    "month_sums",
    "resolve_tenants",
    "void_invoice",
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


def month_sums(
    conn: Connection,
    start: datetime,
    end: datetime,
    hours_in_month: int,
    tenant_ids: Sequence[int] | None = None,
) -> dict[str, MonthSums]:
    """Every tenant's quantities summed over the paid hours of ``[start, end)``: two statements."""
    us, ur, t = m.usage_snapshots, m.usage_snapshot_roles, m.tenants
    paid = us.c.plan == "standard"

    def paid_sum(col: sa.ColumnElement[int]) -> sa.ColumnElement[int]:
        return sa.func.coalesce(sa.func.sum(sa.case((paid, col), else_=0)), 0)

    where = [us.c.hour >= start, us.c.hour < end]
    if tenant_ids is not None:
        where.append(us.c.tenant_id.in_(list(tenant_ids)))
    rows = conn.execute(
        sa.select(
            t.c.key,
            paid_sum(sa.literal(1)),
            paid_sum(us.c.standard_hosts),
            paid_sum(us.c.micro_hosts),
            paid_sum(us.c.standard_overage),
            paid_sum(us.c.micro_overage),
            paid_sum(us.c.service_metrics),
            paid_sum(us.c.monitors),
            sa.func.coalesce(
                sa.func.max(
                    sa.case((us.c.plan == "free", us.c.standard_hosts + us.c.micro_hosts),
                            else_=0)
                ),
                0,
            ),
        )
        .join(t, t.c.id == us.c.tenant_id)
        .where(*where)
        .group_by(t.c.key)
    ).all()

    role_where = [ur.c.hour >= start, ur.c.hour < end, paid]
    if tenant_ids is not None:
        role_where.append(ur.c.tenant_id.in_(list(tenant_ids)))
    roles: dict[str, list[tuple[str, int]]] = {}
    for key, role, total in conn.execute(
        sa.select(t.c.key, ur.c.role, sa.func.sum(ur.c.hosts))
        .join(us, sa.and_(us.c.tenant_id == ur.c.tenant_id, us.c.hour == ur.c.hour))
        .join(t, t.c.id == ur.c.tenant_id)
        .where(*role_where)
        .group_by(t.c.key, ur.c.role)
    ):
        roles.setdefault(key, []).append((role, int(total)))

    return {
        r[0]: MonthSums(
            tenant=r[0], hours_in_month=hours_in_month, paid_hours=int(r[1]),
            standard_hosts=int(r[2]), micro_hosts=int(r[3]), standard_overage=int(r[4]),
            micro_overage=int(r[5]), service_metrics=int(r[6]), monitors=int(r[7]),
            roles=tuple(sorted(roles.get(r[0], []))), free_max_hosts=int(r[8]),
        )
        for r in rows
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
    conn: Connection, period: str, tenant_ids: Sequence[int] | None = None
) -> dict[str, list[StoredInvoice]]:
    """Every revision of ``period`` (oldest first per tenant), with lines and adjustments:
    three statements for all tenants."""
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
    if ids:
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


def void_invoice(conn: Connection, invoice: StoredInvoice, at: datetime) -> None:
    """draft → void. Refuses anything but a draft (final invoices are immutable)."""
    if invoice.status != "draft":
        raise InvoiceImmutable(
            f"invoice {invoice.tenant} {invoice.period} revision {invoice.revision} is "
            f"{invoice.status}; only a draft can be voided",
            tenant=invoice.tenant, period=invoice.period, revision=invoice.revision,
        )
    inv = b.invoices
    done = conn.execute(
        sa.update(inv)
        .where(inv.c.id == invoice.id, inv.c.status == "draft")
        .values(status="void", voided_at=at)
    ).rowcount
    if done != 1:
        raise InvoiceImmutable(
            f"invoice {invoice.tenant} {invoice.period} revision {invoice.revision} changed "
            "under us (no longer a draft)",
            tenant=invoice.tenant, period=invoice.period,
        )


def finalize_drafts(
    conn: Connection, period: str, at: datetime, tenant_ids: Sequence[int] | None = None
) -> int:
    """draft → final for every current draft of ``period``: one statement. Returns the count."""
    inv = b.invoices
    where = [inv.c.period == period, inv.c.status == "draft"]
    if tenant_ids is not None:
        where.append(inv.c.tenant_id.in_(list(tenant_ids)))
    return int(conn.execute(sa.update(inv).where(*where).values(status="final",
                                                                 finalized_at=at)).rowcount)


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
