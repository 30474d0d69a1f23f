"""Job logs read from CloudWatch Logs, for ``aggregate-job-logs`` where the logs are not files.

On AWS the ECS tasks write their JSON log lines to stderr, the ``awslogs`` driver puts each line
into the log group ``/hostmeter/<stack>/jobs`` as one event, and the Lambda function that runs
``aggregate-job-logs`` has no file of them. It reads the log groups named in
``HOSTMETER_LOG_GROUPS`` (comma-separated) or ``hostmeter metrics aggregate --log-group``
instead, with ``FilterLogEvents``.

**Exactly once, by ingestion time.** Each group has a checkpoint in ``log_checkpoints`` (path
``cloudwatch-logs:<group>``, ``offset`` = milliseconds since the epoch): a pass takes the events
whose *ingestion* time is after the checkpoint and at or before a horizon ``SETTLE`` before now,
then moves the checkpoint to the horizon. Ingestion time only grows, so no event falls in two
windows; the horizon leaves events that CloudWatch has ingested but may not show yet for the
next pass. ``FilterLogEvents`` selects by *event* time, so a pass asks from ``LOOKBACK`` before
the checkpoint: an event stamped more than ``LOOKBACK`` before it was ingested (a task that
could not reach CloudWatch for an hour) is missed. The first pass of a group reads everything
it retains. Run rows are keyed by run id anyway, so a line read twice would add nothing; the
window keeps the malformed-line counter exact too.

**Lambda's own lines.** Lambda writes ``START``/``END``/``REPORT``/``INIT_*`` lines of its own
into a function's log group; they are skipped, not counted as malformed. Anything else that is
not a JSON object (a traceback, say) is counted as malformed.

**Reading outside the write.** This module only fetches:
:func:`jobs.monitoring.logmetrics.aggregate` reads the checkpoints, fetches every group before its
database transaction, and inside it compares each checkpoint again
(:func:`jobs.monitoring.logmetrics.store_log_group`): if another pass moved it meanwhile, that batch
is dropped (the other pass stored the same events).

boto3 is an optional dependency (``pip install 'hostmeter[aws]'``; the Lambda runtime has it).
The client is injectable: anything with ``filter_log_events(**kwargs) -> dict``. The endpoint
follows boto3's own settings, e.g. ``AWS_ENDPOINT_URL_CLOUDWATCH_LOGS``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from jobs.runtime.errors import AwsError

__all__ = [
    "CHECKPOINT_HEAD",
    "LOOKBACK",
    "SETTLE",
    "LogGroupBatch",
    "LogsClient",
    "checkpoint_key",
    "log_groups_from_env",
    "logs_client",
    "read_log_group",
]

#: how long after ingestion an event is taken to be visible to FilterLogEvents
SETTLE = timedelta(minutes=2)
#: how far before its ingestion an event may be stamped and still be read
LOOKBACK = timedelta(hours=1)
#: the ``head`` of a log group's checkpoint row (a file's is a hash of its first line)
CHECKPOINT_HEAD = "cloudwatch-logs"
_PREFIX = "cloudwatch-logs:"
#: the lines Lambda itself writes into a function's log group (Text format)
_PLATFORM = ("START RequestId:", "END RequestId:", "REPORT RequestId:", "INIT_START ",
             "INIT_REPORT ", "INIT_RUNTIME_DONE", "EXTENSION\t", "TELEMETRY\t", "RESTORE_")


class LogsClient(Protocol):
    def filter_log_events(self, **kwargs: Any) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class LogGroupBatch:
    """What one pass fetched from one log group (not yet parsed or stored)."""

    group: str
    since: int | None  # the checkpoint it was read from (ms since the epoch), None: first pass
    until: int  # the checkpoint it moves to
    messages: list[str] = field(default_factory=list)  # Lambda's own lines left out
    events: int = 0


def checkpoint_key(group: str) -> str:
    return _PREFIX + group


def log_groups_from_env(environ: Mapping[str, str]) -> list[str]:
    """``HOSTMETER_LOG_GROUPS`` (comma-separated) → group names, blanks dropped."""
    raw = environ.get("HOSTMETER_LOG_GROUPS", "")
    return [g.strip() for g in raw.split(",") if g.strip()]


def logs_client() -> LogsClient:
    """A boto3 CloudWatch Logs client (region and credentials from the usual AWS settings)."""
    try:
        import boto3
    except ImportError:
        raise AwsError("reading CloudWatch Logs needs boto3: pip install 'hostmeter[aws]'"
                       ) from None
    try:
        client: LogsClient = boto3.client("logs")
    except Exception as exc:  # botocore: no region, bad endpoint, ...
        raise AwsError(f"CloudWatch Logs client: {_one_line(exc)}") from None
    return client


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _events(client: LogsClient, group: str, request: dict[str, Any]
            ) -> Iterator[Mapping[str, Any]]:
    token: str | None = None
    while True:
        page_request = dict(request, nextToken=token) if token else request
        try:
            page = client.filter_log_events(**page_request)
        except Exception as exc:  # botocore ClientError / EndpointConnectionError / ...
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code == "ResourceNotFoundException":
                raise AwsError(f"CloudWatch Logs: log group {group!r} does not exist",
                               log_group=group) from None
            raise AwsError(f"CloudWatch Logs {group}: {_one_line(exc)}",
                           log_group=group) from None
        yield from page.get("events") or ()
        next_token = page.get("nextToken")
        if not next_token or next_token == token:
            return
        token = next_token


def read_log_group(client: LogsClient, group: str, *, since: int | None, now: datetime
                   ) -> LogGroupBatch:
    """The messages of ``group`` ingested after ``since`` (its checkpoint, ms since the epoch;
    None: everything it retains) and at most ``SETTLE`` before ``now``."""
    horizon = _ms(now - SETTLE)
    if since is not None and since >= horizon:
        return LogGroupBatch(group=group, since=since, until=since)
    request: dict[str, Any] = {"logGroupName": group}
    if since is not None:
        request["startTime"] = max(0, since - int(LOOKBACK.total_seconds() * 1000))
    messages: list[str] = []
    events = 0
    for event in _events(client, group, request):
        ingested = event.get("ingestionTime")
        if not isinstance(ingested, int) or ingested > horizon or (
                since is not None and ingested <= since):
            continue
        events += 1
        message = str(event.get("message") or "").rstrip("\r\n")
        if not message.startswith(_PLATFORM):
            messages.append(message)
    return LogGroupBatch(group=group, since=since, until=horizon, messages=messages,
                         events=events)
