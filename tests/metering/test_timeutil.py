from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from metering.errors import InvalidWindow
from metering.timeutil import (
    floor_hour,
    hours_between,
    month_bounds,
    parse_instant,
    parse_period,
    previous_period,
)

TOKYO = ZoneInfo("Asia/Tokyo")


@pytest.mark.parametrize(
    ("period", "hours"),
    [("2026-02", 672), ("2028-02", 696), ("2026-04", 720), ("2026-10", 744), ("2026-12", 744)],
)
def test_hours_in_a_tokyo_month(period: str, hours: int) -> None:
    start, end = month_bounds(period, TOKYO)
    assert start == datetime.fromisoformat(f"{period}-01T00:00:00+09:00")
    assert len(list(hours_between(start, end))) == hours


def test_a_month_with_a_dst_change_has_an_odd_number_of_hours() -> None:
    start, end = month_bounds("2026-03", ZoneInfo("Europe/Berlin"))
    assert len(list(hours_between(start, end))) == 31 * 24 - 1


@pytest.mark.parametrize("text", ["2026-13", "2026-1", "26-10", "", "2026-10-01", "abcd-ef"])
def test_bad_periods(text: str) -> None:
    with pytest.raises(InvalidWindow, match="YYYY-MM"):
        parse_period(text)


@pytest.mark.parametrize("text", ["2026-10-15T10:00:00", "yesterday", "", "2026-10-15 25:00Z"])
def test_bad_instants(text: str) -> None:
    with pytest.raises(InvalidWindow):
        parse_instant(text)


def test_instants_and_hours() -> None:
    at = parse_instant("2026-10-15T19:59:59.999+09:00")
    assert at == datetime(2026, 10, 15, 10, 59, 59, 999000, tzinfo=UTC)
    assert floor_hour(at) == datetime(2026, 10, 15, 10, tzinfo=UTC)
    assert previous_period(datetime(2026, 11, 30, 16, tzinfo=UTC), TOKYO) == "2026-11"
    assert previous_period(datetime(2026, 1, 1, 0, tzinfo=TOKYO), TOKYO) == "2025-12"
