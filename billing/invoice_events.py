"""The invoice events a close, a rerun and a finalize write to the outbox (:mod:`billing.outbox`).

One event per invoice change a customer can see, written in the billing run's own transaction:

- ``invoice.drafted``: a tenant's first live revision of the period (the close's revision 1,
  or a new draft after every earlier one was voided);
- ``invoice.revised``: a rerun replaced the current draft (``revised``), or corrected a final
  invoice with a new draft and an adjustment (``adjusted``), or found the data back at the final
  invoice's and voided the draft that differed (``restored``: the final revision stands again);
- ``invoice.finalized``: a draft turned final.

An unchanged tenant, a stale one, a failed one and a dry run write nothing, so a rerun that
changes nothing sends nothing. Each event's key names the fact (tenant, period, revision), so the
same change can never be announced twice. Money in the payload is a decimal string in the
currency's units (``"12318"`` yen, ``"12.34"`` dollars), never a float.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from billing.outbox import Event
from billing.repository import FinalizedInvoice, RevisionWrite
from billing.rules import Rating, format_money

__all__ = ["finalized_events", "written_events"]


def _money(amount: int, minor_units: int) -> str:
    return format_money(amount, minor_units)


def _rating_data(rating: Rating) -> dict[str, Any]:
    mu = rating.minor_units
    return {
        "currency": rating.currency,
        "catalog": rating.catalog_version,
        "standard_units": rating.standard_units,
        "micro_units": rating.micro_units,
        "subtotal": _money(rating.subtotal, mu),
        "tax": _money(rating.tax, mu),
        "total": _money(rating.total, mu),
        "lines": [
            {"item": ln.item, "unit": ln.unit, "units": ln.units,
             "unit_price": _money(ln.unit_price, mu), "amount": _money(ln.amount, mu)}
            for ln in rating.lines
        ],
    }


def written_events(writes: Sequence[RevisionWrite], *, period: str, action: str) -> list[Event]:
    """The events of the revisions a close or rerun has just written (failed tenants left out
    by the caller). ``action`` is the run's (``close`` or ``rerun``), for the payload."""
    events: list[Event] = []
    for w in writes:
        if w.rating is None:
            if w.void is None:
                continue
            # restored: the draft that differed is void; the final revision stands again.
            final = w.adjusts
            events.append(Event(
                type="invoice.revised", tenant=w.tenant, tenant_id=w.tenant_id,
                key=f"invoice.revised:{w.tenant}:{period}:restored:{w.void.revision}",
                data={"period": period, "change": "restored", "run": action,
                      "revision": final.revision if final else None, "status": "final",
                      "voided_revision": w.void.revision,
                      "currency": w.void.currency,
                      "total": (_money(final.total, final.minor_units) if final else None)},
            ))
            continue
        adjustment = None
        if w.adjusts is not None:
            adjustment = {
                "against_revision": w.adjusts.revision,
                "amount": _money(w.rating.total - w.adjusts.total, w.rating.minor_units),
                "standard_units": w.rating.standard_units - w.adjusts.standard_units,
                "micro_units": w.rating.micro_units - w.adjusts.micro_units,
                "reason": w.reason,
            }
        revised = w.void is not None or w.adjusts is not None
        kind = "invoice.revised" if revised else "invoice.drafted"
        change = ("adjusted" if w.adjusts is not None else "revised") if revised else "drafted"
        events.append(Event(
            type=kind, tenant=w.tenant, tenant_id=w.tenant_id,
            key=f"{kind}:{w.tenant}:{period}:{w.revision}",
            data={"period": period, "change": change, "run": action, "revision": w.revision,
                  "status": "draft",
                  "replaces_revision": w.void.revision if w.void is not None else None,
                  "adjustment": adjustment, **_rating_data(w.rating)},
        ))
    return events


def finalized_events(invoices: Sequence[FinalizedInvoice], *, period: str) -> list[Event]:
    """One ``invoice.finalized`` per draft a finalize turned final (the event's ``created`` is
    the moment it was finalized)."""
    return [
        Event(
            type="invoice.finalized", tenant=f.tenant, tenant_id=f.tenant_id,
            key=f"invoice.finalized:{f.tenant}:{period}:{f.revision}",
            data={"period": period, "revision": f.revision, "status": "final",
                  "currency": f.currency, "standard_units": f.standard_units,
                  "micro_units": f.micro_units,
                  "subtotal": _money(f.subtotal, f.minor_units),
                  "tax": _money(f.tax, f.minor_units), "total": _money(f.total, f.minor_units)},
        )
        for f in invoices
    ]
