"""Fixtures shared by the job tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from metering import db


@pytest.fixture
def bench_engine(db_url: str) -> Iterator[sa.Engine]:
    """An engine on a fresh, migrated database of the test's backend (for ``bench``)."""
    engine = db.create_engine(db_url)
    yield engine
    engine.dispose()
