"""Settings read from the environment, once, into a frozen value.

| variable                 | default                  | meaning                                  |
|--------------------------|--------------------------|------------------------------------------|
| HOSTMETER_DATABASE_URL   | ``sqlite:///hostmeter.db`` | where usage, snapshots and invoices live |
| HOSTMETER_BILLING_TZ     | ``Asia/Tokyo``           | the zone whose calendar months are billed |
| HOSTMETER_LOG_DIR        | ``logs``                 | JSON log files (also written to stderr)  |
| HOSTMETER_RETENTION_DAYS | ``400``                  | raw usage kept before ``prune-usage``    |
| HOSTMETER_REDIS_URL      | (none)                   | Redis of the post-time hot path          |
| HOSTMETER_REDIS_CLUSTER  | ``false``                | ``true``: that URL is a Cluster node     |

``HOSTMETER_REDIS_URL`` is ``redis://[:PASSWORD@]HOST:PORT/DB`` (``rediss://`` for TLS); unset,
there is no hot path (``flush-usage`` does nothing, ``snapshot-usage`` reads the database only).

Webhook delivery (``deliver-webhooks``): ``HOSTMETER_WEBHOOK_TIMEOUT`` (seconds, default 10)
bounds each phase of a POST (connect, send, wait for the answer);
``HOSTMETER_WEBHOOK_RETRY_HOURS`` (default 72) is how long a failing delivery is retried before
it is ``dead``; ``HOSTMETER_WEBHOOK_RUN_SECONDS`` (default 40) is how long one run keeps
starting attempts (a run then ends within that plus one timeout, inside its minute).

The database URL is checked where an engine is made (:func:`metering.db.parse_url`):
``sqlite:///PATH`` or ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB`` (``postgres://`` and
``postgresql://`` mean the same); an ``@`` in the password is written ``%40``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from metering.errors import ConfigError

__all__ = ["DEFAULT_DATABASE_URL", "Settings"]

DEFAULT_DATABASE_URL = "sqlite:///hostmeter.db"


def _retention(value: str | None) -> int:
    if not value:
        return 400
    try:
        days = int(value)
    except ValueError:
        days = 0
    if days < 31:
        raise ConfigError(
            f"HOSTMETER_RETENTION_DAYS={value!r} must be a whole number of days >= 31 "
            "(raw usage of a month must outlive its billing)",
            setting="HOSTMETER_RETENTION_DAYS",
        )
    return days


def _number(name: str, value: str | None, default: float, low: float, high: float) -> float:
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not low <= number <= high:  # also NaN
        raise ConfigError(f"{name}={value!r} must be a number from {low:g} to {high:g}",
                          setting=name)
    return number


def _flag(name: str, value: str | None) -> bool:
    text = (value or "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={value!r} must be true or false", setting=name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Process-wide settings."""

    database_url: str = DEFAULT_DATABASE_URL
    billing_tz: str = "Asia/Tokyo"
    log_dir: str = "logs"
    retention_days: int = 400
    redis_url: str | None = None
    redis_cluster: bool = False
    webhook_timeout_s: float = 10.0
    webhook_retry_hours: float = 72.0
    webhook_run_s: float = 40.0

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.billing_tz)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        settings = cls(
            database_url=env.get("HOSTMETER_DATABASE_URL") or DEFAULT_DATABASE_URL,
            billing_tz=env.get("HOSTMETER_BILLING_TZ") or "Asia/Tokyo",
            log_dir=env.get("HOSTMETER_LOG_DIR") or "logs",
            retention_days=_retention(env.get("HOSTMETER_RETENTION_DAYS")),
            redis_url=env.get("HOSTMETER_REDIS_URL") or None,
            redis_cluster=_flag("HOSTMETER_REDIS_CLUSTER", env.get("HOSTMETER_REDIS_CLUSTER")),
            webhook_timeout_s=_number("HOSTMETER_WEBHOOK_TIMEOUT",
                                      env.get("HOSTMETER_WEBHOOK_TIMEOUT"), 10.0, 0.1, 120.0),
            webhook_retry_hours=_number("HOSTMETER_WEBHOOK_RETRY_HOURS",
                                        env.get("HOSTMETER_WEBHOOK_RETRY_HOURS"), 72.0, 0.0, 720.0),
            webhook_run_s=_number("HOSTMETER_WEBHOOK_RUN_SECONDS",
                                  env.get("HOSTMETER_WEBHOOK_RUN_SECONDS"), 40.0, 1.0, 3600.0),
        )
        try:
            ZoneInfo(settings.billing_tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(
                f"HOSTMETER_BILLING_TZ={settings.billing_tz!r} is not an IANA time zone "
                "(for example Asia/Tokyo or UTC)",
                setting="HOSTMETER_BILLING_TZ",
            ) from exc
        return settings
