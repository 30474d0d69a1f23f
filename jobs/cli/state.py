"""What every ``hostmeter`` command shares: the settings and a database engine created on first
use (so ``--help`` and bad input never touch the database), and parsing of ``--at``."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import click
from sqlalchemy.engine import Engine

from metering import db
from metering.settings import Settings
from metering.timeutil import parse_instant

__all__ = ["State", "current_state", "parse_at"]


@dataclasses.dataclass
class State:
    """The group's settings (``--database-url`` applied) and its engine, made on first use."""

    settings: Settings
    _engine: Engine | None = None

    def engine(self, *, schema: bool = True) -> Engine:
        if self._engine is None:
            self._engine = db.create_engine(self.settings.database_url)
        if schema:
            db.ensure_schema(self._engine)
        return self._engine


def current_state() -> State:
    return click.get_current_context().find_object(State)  # type: ignore[return-value]


def parse_at(value: str | None, what: str = "--at") -> datetime:
    if value is None:
        return datetime.now(UTC)
    return parse_instant(value, what=what)
