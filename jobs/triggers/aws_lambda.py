"""The AWS Lambda entry point: an EventBridge trigger in, one ledgered run out.

``handler(event, context)`` accepts two payload shapes.

(a) An **EventBridge Scheduler** payload — the target's input, with the scheduled time filled in
by Scheduler's context attribute::

    {"job": "close-billing-period",
     "scheduled_time": "<aws.scheduler.scheduled-time>",   # e.g. "2026-11-01T03:00:00+09:00"
     "shard": "0/4",                                        # optional, shardable jobs only
     "period": "2026-10"}                                   # optional, jobs that take --period

    Exactly these keys: an unknown key (``"perod"``, ``"force"``) is refused rather than ignored,
    because ignoring it would silently run a different window.

(b) An **EventBridge rule** "Scheduled Event" (a ``cron``/``rate`` rule whose target input puts
the job in ``detail``)::

    {"version": "0", "id": "…", "detail-type": "Scheduled Event", "source": "aws.events",
     "account": "…", "time": "2026-10-15T10:05:00Z", "region": "ap-northeast-1",
     "resources": ["arn:aws:events:…:rule/hostmeter-snapshot-usage"],
     "detail": {"job": "snapshot-usage"}}

    ``time`` is the scheduled time; ``detail`` takes the same ``job``/``shard``/``period`` keys
    as (a) and nothing else. The envelope's other keys belong to AWS and are not checked.

Any object with a ``detail-type`` key is read as (b), anything else as (a). Times must be ISO 8601
with an offset (``Z`` or ``+09:00``). Both shapes become a :class:`~jobs.triggers.runner.RunRequest`
with trigger ``"schedule"`` and go through :func:`jobs.triggers.runner.execute`, so the ledger key
(job, the window the scheduled time selects, shard) makes delivery idempotent: the same event
delivered twice — or a rule and a Scheduler payload for the same time — does the work once; the
second delivery is recorded as ``skipped`` and returns normally.

What the handler returns and raises:

- success or skip → :meth:`~jobs.triggers.runner.RunOutcome.as_dict` (JSON-serialisable);
- a run that ends ``failed`` or ``partial`` → :class:`~jobs.runtime.errors.JobFailed` (job, status,
  run id and error in the message). Lambda counts the invocation as failed and the platform
  retries it; the retry reaches the same key, which did not succeed, so it runs again (a
  ``partial`` close bills the tenants that are still missing);
- a malformed payload → :class:`~jobs.runtime.errors.BadTrigger`, an unknown job →
  :class:`~jobs.runtime.errors.UnknownJob`, raised before any database access. The platform retries
  these too; every retry fails the same way without writing anything, and the event then lands
  in the dead-letter queue (or on-failure destination), where an operator sees it. That is on
  purpose: returning an error value instead would count as a success and silently drop a
  misconfigured schedule — a month that is never billed.

Environment (besides :mod:`metering.settings`): ``HOSTMETER_LOCK_WAIT_S`` (default 60) — how long a
delivery waits for a concurrent run of the same key before recording ``skipped``; keep it well
under the function timeout. ``HOSTMETER_LOG_DIR=""`` means no log file (stderr, i.e. CloudWatch,
only); an unwritable log directory also degrades to stderr only. ``HOSTMETER_LOG_GROUPS`` makes
``aggregate-job-logs`` read CloudWatch Logs (:mod:`jobs.monitoring.cloudwatch`).

**Secrets.** Lambda environment variables cannot reference Secrets Manager or SSM SecureString
values, so the handler fetches them itself, at the start of every invocation (a rotated secret
is picked up by the next run, without a deployment): for each setting of
:data:`SECRET_SETTINGS`, ``<SETTING>_SECRET_ARN`` names a Secrets Manager secret whose
``SecretString`` is the value, or ``<SETTING>_SSM_PARAMETER`` an SSM parameter (decrypted).
A reference wins over a value given directly; giving both kinds of reference is an error. A
secret that cannot be fetched fails the invocation (:class:`~jobs.runtime.errors.AwsError`, one
line, never the value) before the database is touched. Values are never logged.

Across warm invocations the engine is cached per database URL and the schema is checked once per
engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import structlog
from sqlalchemy.engine import Engine

from jobs import registry
from jobs.runtime.errors import AwsError, BadTrigger, JobFailed
from jobs.runtime.logconfig import configure_logging, register_secrets
from jobs.triggers.runner import RunOutcome, RunRequest, Shard, execute, parse_shard
from metering.db import create_engine, describe_error, ensure_schema, password_forms
from metering.display import quote_name
from metering.errors import ConfigError, InvalidWindow
from metering.settings import Settings
from metering.timeutil import parse_instant, parse_period

__all__ = ["DEFAULT_LOCK_WAIT_S", "SECRET_SETTINGS", "TRIGGER", "handler", "parse_event",
           "resolve_secrets"]

TRIGGER = "schedule"
DEFAULT_LOCK_WAIT_S = 60.0
SCHEDULED_EVENT = "Scheduled Event"
_JOB_KEYS = frozenset({"job", "shard", "period"})
_SCHEDULER_KEYS = _JOB_KEYS | {"scheduled_time"}

log = structlog.get_logger("hostmeter.aws")

#: the settings the handler may fetch from Secrets Manager or SSM (see the module docstring)
SECRET_SETTINGS = ("HOSTMETER_DATABASE_URL", "MACKEREL_API_KEY")

_ENGINES: dict[str, Engine] = {}
_LOGGING: dict[str, str | None] = {}
_CLIENTS: dict[str, Any] = {}


def _bad(message: str, **context: Any) -> BadTrigger:
    return BadTrigger(" ".join(message.split()), **context)


def _keys(keys: Any) -> str:
    return ", ".join(sorted(repr(k) for k in keys))


def parse_event(event: Mapping[str, Any]) -> RunRequest:
    """A Scheduler payload or an EventBridge "Scheduled Event" → a :class:`RunRequest`.

    Raises :class:`BadTrigger` (one-line message) for a malformed payload and
    :class:`~jobs.runtime.errors.UnknownJob` for a job that is not registered.
    """
    if not isinstance(event, Mapping):
        raise _bad(f"event must be a JSON object, got {type(event).__name__}")
    if "detail-type" in event:
        kind = event["detail-type"]
        if kind != SCHEDULED_EVENT:
            raise _bad(f"EventBridge event detail-type {quote_name(kind)} is not "
                       f"{SCHEDULED_EVENT!r}")
        detail = event.get("detail")
        if not isinstance(detail, Mapping):
            raise _bad("Scheduled Event has no detail object (expected "
                       "\"detail\": {\"job\": ...} from the rule's target input)")
        fields, where, allowed = detail, "Scheduled Event detail", _JOB_KEYS
        time_key, raw_time = "time", event.get("time")
    else:
        fields, where, allowed = event, "Scheduler payload", _SCHEDULER_KEYS
        time_key, raw_time = "scheduled_time", event.get("scheduled_time")
    unknown = set(fields) - allowed
    if unknown:
        raise _bad(f"{where} has unknown key(s) {_keys(unknown)} (allowed: {_keys(allowed)})")
    job = fields.get("job")
    if not isinstance(job, str) or not job:
        raise _bad(f"{where} has no job (expected \"job\": \"snapshot-usage\" or another "
                   "registered job name)")
    spec = registry.get(job)
    if raw_time is None:
        envelope = "Scheduled Event" if time_key == "time" else where
        raise _bad(f"{envelope} has no {time_key} (the scheduled time, ISO 8601 with an offset)",
                   job=spec.name)
    try:
        scheduled = parse_instant(raw_time, what=time_key)
    except InvalidWindow as exc:
        raise _bad(str(exc), job=spec.name) from None

    shard = Shard()
    raw_shard = fields.get("shard")
    if raw_shard is not None:
        if not isinstance(raw_shard, str):
            raise _bad(f"shard {quote_name(raw_shard)} is not a string I/N (e.g. \"0/4\")",
                       job=spec.name)
        shard = parse_shard(raw_shard)
        if shard.count > 1 and not spec.shardable:
            raise _bad(f"job {spec.name} works on all tenants at once and cannot be sharded "
                       f"(shard {quote_name(raw_shard)})", job=spec.name)

    options: dict[str, Any] = {}
    raw_period = fields.get("period")
    if raw_period is not None:
        if "period" not in spec.options:
            raise _bad(f"job {spec.name} takes no period (got {quote_name(raw_period)})",
                       job=spec.name)
        if not isinstance(raw_period, str):
            raise _bad(f"period {quote_name(raw_period)} is not a string YYYY-MM", job=spec.name)
        try:
            parse_period(raw_period)
        except InvalidWindow as exc:
            raise _bad(str(exc), job=spec.name) from None
        options["period"] = raw_period
    return RunRequest(job=spec.name, scheduled_time=scheduled, trigger=TRIGGER, shard=shard,
                      options=options)


def handler(event: Any, context: Any = None) -> dict[str, Any]:
    """The Lambda handler: run the job ``event`` names for its scheduled time (see the module
    docstring). Returns the run's summary; raises on a bad event or a failed/partial run."""
    _configure_logging(Settings.from_env())
    request_id = getattr(context, "aws_request_id", None)
    with structlog.contextvars.bound_contextvars(aws_request_id=request_id):
        try:
            req = parse_event(event)
        except Exception as exc:
            log.error("trigger_rejected", error=describe_error(exc))
            raise
        try:
            resolve_secrets(os.environ)
        except Exception as exc:
            log.error("secrets_unavailable", error=describe_error(exc))
            raise
        # Logging was set up before the secrets were fetched: hide their values from now on.
        register_secrets([*password_forms(os.environ.get("HOSTMETER_DATABASE_URL")),
                          os.environ.get("MACKEREL_API_KEY", "")])
        settings = Settings.from_env()
        engine = _engine(settings.database_url)
        outcome = execute(engine, settings, req, wait_s=_lock_wait_s())
        summary = outcome.as_dict()
        if outcome.status in ("failed", "partial"):
            log.error("lambda_run_failed", **summary)
            raise JobFailed(_failure_message(outcome), job=outcome.job, status=outcome.status,
                            run_id=outcome.run_id, summary=summary) from outcome.exception
        return summary


def _aws_client(service: str) -> Any:
    """A boto3 client for ``service``, made once per process (region from AWS_REGION)."""
    client = _CLIENTS.get(service)
    if client is None:
        try:
            import boto3
        except ImportError:
            raise AwsError(f"fetching secrets from {service} needs boto3: "
                           "pip install 'hostmeter[aws]'") from None
        client = _CLIENTS[service] = boto3.client(service)
    return client


def _fetch(client: Any, service: str, ref: str, setting: str) -> str:
    try:
        if service == "secretsmanager":
            value = client.get_secret_value(SecretId=ref).get("SecretString")
        else:
            value = client.get_parameter(Name=ref, WithDecryption=True)["Parameter"]["Value"]
    except Exception as exc:  # botocore ClientError, EndpointConnectionError, ...
        why = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise AwsError(f"{setting}: cannot read {ref} from {service}: {why}",
                       setting=setting) from None
    if not isinstance(value, str) or not value:
        raise AwsError(f"{setting}: {ref} in {service} has no string value", setting=setting)
    return value


def resolve_secrets(environ: MutableMapping[str, str],
                    client: Callable[[str], Any] = _aws_client) -> list[str]:
    """Set each of :data:`SECRET_SETTINGS` in ``environ`` from its ``_SECRET_ARN`` or
    ``_SSM_PARAMETER`` reference; returns the names set. ``client(service)`` gives a boto3-like
    client for ``"secretsmanager"`` or ``"ssm"``."""
    done = []
    for setting in SECRET_SETTINGS:
        arn = environ.get(f"{setting}_SECRET_ARN", "").strip()
        parameter = environ.get(f"{setting}_SSM_PARAMETER", "").strip()
        if arn and parameter:
            raise ConfigError(f"set {setting}_SECRET_ARN or {setting}_SSM_PARAMETER, not both",
                              setting=setting)
        if arn:
            environ[setting] = _fetch(client("secretsmanager"), "secretsmanager", arn, setting)
        elif parameter:
            environ[setting] = _fetch(client("ssm"), "ssm", parameter, setting)
        else:
            continue
        done.append(setting)
    return done


def _failure_message(outcome: RunOutcome) -> str:
    why = outcome.error
    if not why:
        failed = {k: v for k, v in outcome.counts.items() if "fail" in k and v}
        why = ", ".join(f"{k}={v}" for k, v in failed.items()) or "see the run ledger"
    return " ".join(
        f"{outcome.job} {outcome.status}: run {outcome.run_id} "
        f"({outcome.logical_time.isoformat()}, shard {outcome.shard}, attempt {outcome.attempt}): "
        f"{why}".split())


def _lock_wait_s() -> float:
    raw = os.environ.get("HOSTMETER_LOCK_WAIT_S", "").strip()
    if not raw:
        return DEFAULT_LOCK_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"HOSTMETER_LOCK_WAIT_S={raw!r} is not a number of seconds >= 0",
                          setting="HOSTMETER_LOCK_WAIT_S")
    return value


def _configure_logging(settings: Settings) -> None:
    """Configure logging on the first invocation (again only if the log directory changes)."""
    log_dir: str | None = settings.log_dir
    if os.environ.get("HOSTMETER_LOG_DIR") == "":
        log_dir = None  # explicitly no file: stderr (CloudWatch) only
    if "log_dir" in _LOGGING and _LOGGING["log_dir"] == log_dir:
        return
    configure_logging(log_dir)
    _LOGGING["log_dir"] = log_dir


def _engine(url: str) -> Engine:
    """The cached engine for ``url``, its schema checked once (on first use). A new URL (a
    rotated secret) disposes the engines of the old ones."""
    engine = _ENGINES.get(url)
    if engine is None:
        while _ENGINES:
            _ENGINES.popitem()[1].dispose()
        engine = create_engine(url)
        try:
            ensure_schema(engine)
        except BaseException:
            engine.dispose()
            raise
        _ENGINES[url] = engine
    return engine


def _reset_for_tests() -> None:
    """Dispose every cached engine and forget the logging configuration."""
    while _ENGINES:
        _ENGINES.popitem()[1].dispose()
    _LOGGING.clear()
    _CLIENTS.clear()
