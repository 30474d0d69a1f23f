"""Clock-free time helpers: instants are aware UTC datetimes, hours are floored instants.

Nothing here reads the clock; callers pass the instants they mean.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from metering.display import quote_name
from metering.errors import InvalidWindow, shown

__all__ = [
    "HOUR",
    "floor_hour",
    "hours_between",
    "month_bounds",
    "parse_instant",
    "parse_period",
    "period_of",
    "previous_period",
]

HOUR = timedelta(hours=1)
_PERIOD = re.compile(r"^(\d{4})-(\d{2})$")


def parse_instant(text: str, *, what: str = "instant") -> datetime:
    """Parse an ISO 8601 instant that carries an offset (``Z`` or ``+09:00``) into aware UTC.

    A timestamp without an offset is rejected: it would mean different hours on different hosts.
    One whose UTC instant falls outside years 1–9999 (``9999-12-31T23:30:00-05:00``) is rejected
    too, as :class:`InvalidWindow`, never :class:`OverflowError`.
    """
    if not isinstance(text, str) or not text:
        raise InvalidWindow(
            f"{what} must be an ISO 8601 string with an offset, got {shown(text)}"
        )
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidWindow(
            f"{what} {shown(text)} is not an ISO 8601 instant (expected e.g. "
            "2026-10-15T10:03:00Z)"
        ) from exc
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidWindow(
            f"{what} {shown(text)} has no UTC offset (expected e.g. 2026-10-15T10:03:00Z or "
            "+09:00)"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:30:00-05:00 is in year 10000 in UTC
        raise InvalidWindow(
            f"{what} {shown(text)} is out of range (its UTC instant is not in years 1 to 9999)"
        ) from None


def as_utc(value: datetime) -> datetime:
    """Return ``value`` as aware UTC; a naive datetime is refused."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidWindow(f"naive datetime {value.isoformat()} has no UTC offset")
    return value.astimezone(UTC)


def floor_hour(value: datetime) -> datetime:
    """The start of the UTC hour that contains ``value``."""
    return as_utc(value).replace(minute=0, second=0, microsecond=0)


def hours_between(start: datetime, end: datetime) -> Iterator[datetime]:
    """Every hour start ``h`` with ``start <= h < end`` (both floored to the hour first)."""
    h = floor_hour(start)
    if h < as_utc(start):
        h += HOUR
    stop = as_utc(end)
    while h < stop:
        yield h
        h += HOUR


def parse_period(text: str) -> tuple[int, int]:
    """``YYYY-MM`` → (year, month), or InvalidWindow."""
    m = _PERIOD.match(text or "")
    if not m or not 1 <= int(m.group(2)) <= 12 or int(m.group(1)) < 1970:
        raise InvalidWindow(f"period {quote_name(text)} is not a month in the form YYYY-MM "
                            "(e.g. 2026-10)")
    return int(m.group(1)), int(m.group(2))


def month_bounds(period: str, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC instants ``[start, end)`` of calendar month ``period`` in ``zone``."""
    year, month = parse_period(period)
    first = date(year, month, 1)
    nxt = date(year + (month == 12), month % 12 + 1, 1)
    start = datetime(first.year, first.month, 1, tzinfo=zone).astimezone(UTC)
    end = datetime(nxt.year, nxt.month, 1, tzinfo=zone).astimezone(UTC)
    return start, end


def period_of(instant: datetime, zone: ZoneInfo) -> str:
    """The ``YYYY-MM`` period (in ``zone``) that contains ``instant``."""
    local = as_utc(instant).astimezone(zone)
    return f"{local.year:04d}-{local.month:02d}"


def previous_period(instant: datetime, zone: ZoneInfo) -> str:
    """The calendar month (in ``zone``) before the one that contains ``instant``."""
    local = as_utc(instant).astimezone(zone)
    year, month = (local.year, local.month - 1) if local.month > 1 else (local.year - 1, 12)
    return f"{year:04d}-{month:02d}"
