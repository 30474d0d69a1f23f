"""Errors raised by the billing package.

The tree::

    BillingError
    ├── CatalogError         a catalog file is missing a field or has a bad value
    ├── CoverageError        some hours of the month are not snapshotted and cannot be rebuilt
    ├── InvalidThreshold     a budget alert threshold that cannot be used
    ├── InvoiceImmutable     an attempt to change a final invoice
    ├── ReasonRequired       a rerun would adjust a final invoice but gave no --reason
    ├── UnknownTenant        a --tenant that hostmeter has never seen
    └── WebhookRefused       a webhook endpoint or delivery request that cannot be done
"""

from __future__ import annotations

from metering.errors import ContextError

__all__ = [
    "BillingError",
    "CatalogError",
    "CoverageError",
    "InvalidThreshold",
    "InvoiceImmutable",
    "ReasonRequired",
    "UnknownTenant",
    "WebhookRefused",
]


class BillingError(ContextError):
    """Root of every error the billing package raises on purpose."""


class CatalogError(BillingError):
    """A catalog file cannot be used; the message names the file and the field."""


class CoverageError(BillingError):
    """Hours of the month are not snapshotted and cannot be rebuilt from recorded usage."""


class InvalidThreshold(BillingError):
    """A budget alert threshold that cannot be used (negative, zero, too large, more decimals
    than the currency has, or not a number)."""


class InvoiceImmutable(BillingError):
    """A final invoice cannot be changed; corrections are new revisions with adjustments."""


class ReasonRequired(BillingError):
    """Adjusting a final invoice needs a reason (``--reason``)."""


class UnknownTenant(BillingError):
    """No tenant with that key has ever been recorded."""


class WebhookRefused(BillingError):
    """A webhook request that cannot be done: a bad endpoint URL or secret, an unknown or
    disabled endpoint, an unknown delivery."""
