"""Export :class:`~jobs.monitoring.metricdata.MetricPoint` values to Mackerel as service metrics.

Points go to ``POST {base_url}/api/v0/services/{service}/tsdb`` with the ``X-Api-Key`` header and
a JSON list of ``{"name", "time", "value"}`` (``time`` in epoch seconds, ``value`` a float
converted from the ``Decimal`` here, at the edge).

Metric names
    :func:`mackerel_name` appends the label values, sorted by label *key*, to the point name and
    replaces every character outside ``[a-zA-Z0-9._-]`` with ``_``::

        hostmeter.job.runs {job: snapshot-usage, status: succeeded}
            -> hostmeter.job.runs.snapshot-usage.succeeded

Graphs
    Mackerel draws **service** metrics without any graph definition: it groups them into one graph
    per name up to the *last dot*. So the last label (by key) is the series within a graph and
    the rest of the name picks the graph. The names the metrics store should emit — and
    :data:`GROUPS` — are chosen for that::

        point name (logmetrics)           labels       Mackerel graph (name before last dot)
        hostmeter.job.runs                job, status  hostmeter.job.runs.<job>: a line per status
        hostmeter.job.duration_seconds    job          a line per job
        hostmeter.job.runs_overdue        job          a line per job (from the run ledger)
        hostmeter.job.tenants_expected    job          a line per job (also _processed, _failed)
        hostmeter.job.hosts_counted       job          a line per job (also metrics_counted,
                                                       hours_snapshotted)
        hostmeter.billing.invoices_written job         a line per job (also standard_units,
                                                       micro_units, amount in minor units)
        hostmeter.logs.malformed_lines    -            hostmeter.logs
        hostmeter.fleet.hosts             -            hostmeter.fleet: a line each for hosts,
        hostmeter.fleet.metrics           -            metrics and posts of the whole fleet
        hostmeter.fleet.posts             -            per UTC hour (point time = the hour)
        hostmeter.tenants.noisy           -            hostmeter.tenants: tenants flagged as
                                                       noisy neighbours per UTC hour

    A metric without labels must be the only unlabelled one under its parent name, or it shares
    a graph with a stranger; the fleet totals share ``hostmeter.fleet`` on purpose (one capacity
    graph; their scales differ, so hide a line from the legend to read the others).

    Per-tenant values are not service metrics (see :mod:`jobs.monitoring.exports` for why):
    the names stay a fixed set, whatever the number of tenants or what they are called.

    The graph-definition API (``POST /api/v0/graph-defs/create``) is for *host* custom metrics
    (names start with ``custom.``); it does not change how service metrics are drawn.
    :meth:`MackerelExporter.post_graph_definitions` still posts definitions for the same groups
    (:func:`graph_definitions`), so that hosts posting the same series as custom metrics get the
    same graphs. Posting is idempotent on Mackerel's side but needs doing only once: the method
    returns ``True`` on success and the *caller* records that, next to its checkpoint.

Delivery contract
    :meth:`MackerelExporter.export` skips points older than 24 hours (Mackerel refuses them) with
    a ``mackerel_points_too_old`` warning, sorts the rest by time and posts them in batches.
    429, 5xx and connection errors are retried with exponential backoff (``Retry-After`` is
    honoured, capped at :data:`MAX_RETRY_AFTER_S`); other 4xx fail at once. With a ``deadline``
    (a :func:`time.monotonic` instant) no request runs past it: each request's timeouts are cut to
    the time left, and a wait (backoff or ``Retry-After``) that would end past it ends the export
    instead, reporting ``retry_at`` when Mackerel asked to wait longer than the time left.

    Each batch ends *delivered* (Mackerel answered 2xx), *refused* (it answered an error, so
    nothing of that request is still in flight) or *in doubt*: a request was cut off after it
    was sent (read timeout, dropped connection), so Mackerel may still apply it later, possibly
    after a newer value for the same (name, time). A batch retried into success after such a cut
    is delivered *and* in doubt. :class:`ExportResult` lists the delivered, in-doubt and too-old
    points; on failure :class:`MackerelError` carries the same as ``partial``, and ``sent_until``
    is the newest time *T* such that every point at or before *T* was delivered (``None`` if
    none). Mackerel keeps the last value posted for a (name, time), so sending a point again is
    harmless; what the caller must make sure of is that the *last* value to land is the
    store's (see :mod:`jobs.monitoring.exports`).

The API key is sent in a header only; it is never logged, never in a message, never in a repr.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog

from jobs.monitoring.metricdata import MetricPoint
from jobs.runtime.errors import JobError

__all__ = [
    "GROUPS",
    "MAX_AGE",
    "ExportResult",
    "MackerelError",
    "MackerelExporter",
    "MetricGroup",
    "graph_definitions",
    "mackerel_name",
]

log = structlog.get_logger("hostmeter.mackerel")

MAX_AGE = timedelta(hours=24)
"""Mackerel drops points older than this, so they are skipped before sending."""
MAX_RETRY_AFTER_S = 300.0
"""A ``Retry-After`` longer than this is cut to it, so a hostile answer cannot stop exports for
hours; within a pass a wait never goes past the pass's deadline either."""
_MIN_ATTEMPT_S = 0.05
"""Less time than this left before the deadline: no new request is started."""
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError,
             httpx.UnsupportedProtocol, httpx.LocalProtocolError)
"""Transport errors raised before the request left this process: nothing can land later."""

_NAME_BAD = re.compile(r"[^a-zA-Z0-9._-]")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportResult:
    """What one :meth:`MackerelExporter.export` delivered (all of it, or up to a failure)."""

    sent: int
    skipped_old: int
    batches: int
    last_time: datetime | None
    """The newest point time sent (every point at or before it was accepted), or ``None``."""
    delivered: tuple[MetricPoint, ...] = ()
    """Points Mackerel accepted (answered 2xx)."""
    in_doubt: tuple[MetricPoint, ...] = ()
    """Points of a request cut off after it was sent: Mackerel may still apply it later."""
    too_old: tuple[MetricPoint, ...] = ()
    """Points older than :data:`MAX_AGE`, not sent."""


class MackerelError(JobError):
    """Mackerel refused or could not be reached; ``sent_until`` is how far delivery got,
    ``partial`` what was delivered before, and ``retry_at`` when Mackerel asked to be left
    alone until (a ``Retry-After`` longer than the time the pass had left)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None,
        sent_until: datetime | None,
        sent: int = 0,
        partial: ExportResult | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        super().__init__(message, status=status, sent_until=sent_until, sent=sent)
        self.status = status
        self.sent_until = sent_until
        self.sent = sent
        self.partial = partial
        self.retry_at = retry_at


@dataclass(frozen=True, slots=True, kw_only=True)
class _Outcome:
    """How one :meth:`MackerelExporter._post` ended."""

    ok: bool
    status: int | None
    reason: str
    attempts: int
    in_doubt: bool
    """Some attempt was cut off after sending: the request may still land."""
    out_of_time: bool
    """The deadline stopped the retries (``reason`` says what the last attempt got)."""
    retry_after: float | None
    """The last ``Retry-After`` Mackerel sent (seconds, capped), if any."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricGroup:
    """One graph: the point name, its label keys (sorted), Mackerel unit and title."""

    name: str
    labels: tuple[str, ...]
    unit: str
    title: str


GROUPS: tuple[MetricGroup, ...] = (
    MetricGroup(name="hostmeter.job.runs", labels=("job", "status"), unit="integer",
                title="Job runs by status"),
    MetricGroup(name="hostmeter.job.duration_seconds", labels=("job",), unit="float",
                title="Run duration (s)"),
    MetricGroup(name="hostmeter.job.runs_overdue", labels=("job",), unit="integer",
                title="Runs still running past their deadline"),
    MetricGroup(name="hostmeter.job.tenants_expected", labels=("job",), unit="integer",
                title="Tenants expected"),
    MetricGroup(name="hostmeter.job.tenants_processed", labels=("job",), unit="integer",
                title="Tenants processed"),
    MetricGroup(name="hostmeter.job.tenants_failed", labels=("job",), unit="integer",
                title="Tenants failed"),
    MetricGroup(name="hostmeter.job.hosts_counted", labels=("job",), unit="integer",
                title="Host-hours counted"),
    MetricGroup(name="hostmeter.job.metrics_counted", labels=("job",), unit="integer",
                title="Host metrics counted"),
    MetricGroup(name="hostmeter.job.hours_snapshotted", labels=("job",), unit="integer",
                title="Hours snapshotted"),
    MetricGroup(name="hostmeter.billing.invoices_written", labels=("job",), unit="integer",
                title="Invoices written"),
    MetricGroup(name="hostmeter.billing.standard_units", labels=("job",), unit="integer",
                title="Billed standard units"),
    MetricGroup(name="hostmeter.billing.micro_units", labels=("job",), unit="integer",
                title="Billed micro units"),
    MetricGroup(name="hostmeter.billing.amount", labels=("job",), unit="integer",
                title="Billed amount (minor units of the catalog currency)"),
    MetricGroup(name="hostmeter.logs.malformed_lines", labels=(), unit="integer",
                title="Malformed log lines"),
    MetricGroup(name="hostmeter.fleet.hosts", labels=(), unit="integer",
                title="Fleet per hour: hosts, host metrics, posts"),
    MetricGroup(name="hostmeter.fleet.metrics", labels=(), unit="integer",
                title="Fleet per hour: hosts, host metrics, posts"),
    MetricGroup(name="hostmeter.fleet.posts", labels=(), unit="integer",
                title="Fleet per hour: hosts, host metrics, posts"),
    MetricGroup(name="hostmeter.tenants.noisy", labels=(), unit="integer",
                title="Noisy-neighbour tenants per hour"),
)  # fmt: skip
"""The metric groups hostmeter exports; see the module docstring for how they become graphs."""


def mackerel_name(point: MetricPoint) -> str:
    """The Mackerel metric name: the point name, then label values sorted by key, sanitised."""
    parts = [point.name, *(point.labels[key] for key in sorted(point.labels))]
    return _NAME_BAD.sub("_", ".".join(parts))


def graph_definitions() -> list[dict[str, Any]]:
    """Graph definitions for :data:`GROUPS` in Mackerel's ``graph-defs/create`` format.

    ``#`` in a graph name makes one graph per value of that segment; ``*`` is a series.
    Unlabelled groups under the same parent name (the fleet totals) are one graph with a
    metric each, titled and united by the first of them.
    """
    defs: dict[str, dict[str, Any]] = {}
    for group in GROUPS:
        base = f"custom.{group.name}"
        if group.labels:
            graph = base + ".#" * (len(group.labels) - 1)
            metric = graph + ".*"
        else:  # a lone series: the graph is its parent name
            graph, _, _ = base.rpartition(".")
            metric = base
        definition = defs.setdefault(
            graph, {"name": graph, "displayName": group.title, "unit": group.unit, "metrics": []}
        )
        definition["metrics"].append({"name": metric, "isStacked": False})
    return list(defs.values())


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER_S)


class MackerelExporter:
    """Posts metric points to one Mackerel service; see the module docstring for the contract."""

    def __init__(
        self,
        api_key: str,
        service: str,
        *,
        base_url: str = "https://api.mackerelio.com",
        client: httpx.Client | None = None,
        timeout_s: float = 10.0,
        batch_size: int = 100,
        max_attempts: int = 5,
        backoff_s: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], datetime],
    ) -> None:
        if not api_key:
            raise ValueError("a Mackerel API key is required")
        if batch_size < 1 or max_attempts < 1:
            raise ValueError("batch_size and max_attempts must be at least 1")
        self._api_key = api_key
        self.service = service
        self.base_url = base_url.rstrip("/")
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=timeout_s)
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self._sleep = sleep
        self._monotonic = monotonic
        self._clock = clock

    def __repr__(self) -> str:
        return f"MackerelExporter(service={self.service!r}, base_url={self.base_url!r})"

    def close(self) -> None:
        """Close the HTTP client if this exporter created it."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> MackerelExporter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def tsdb_path(self) -> str:
        """The path service metrics are posted to."""
        return f"/api/v0/services/{self.service}/tsdb"

    def export(self, points: Sequence[MetricPoint], *,
               deadline: float | None = None) -> ExportResult:
        """Send ``points`` (skipping those older than 24 h) in time order, in batches, stopping
        at ``deadline`` (a :func:`time.monotonic` instant) if given.

        Returns what was sent; raises :class:`MackerelError` with ``sent_until`` and ``partial``
        on failure.
        """
        started = self._monotonic()
        cutoff = self._clock() - MAX_AGE
        old = tuple(p for p in points if p.time < cutoff)
        if old:
            log.warning(
                "mackerel_points_too_old",
                count=len(old),
                oldest=min(p.time for p in old).isoformat(),
                cutoff=cutoff.isoformat(),
            )
        fresh = sorted((p for p in points if p.time >= cutoff), key=lambda p: (p.time, p.name))
        sent = 0
        batches = 0
        in_doubt: list[MetricPoint] = []

        def result() -> ExportResult:
            return ExportResult(sent=sent, skipped_old=len(old), batches=batches,
                                last_time=_sent_until(fresh, sent),
                                delivered=tuple(fresh[:sent]), in_doubt=tuple(in_doubt),
                                too_old=old)

        for start in range(0, len(fresh), self.batch_size):
            batch = fresh[start : start + self.batch_size]
            body = [
                {
                    "name": mackerel_name(p),
                    "time": int(p.time.timestamp()),
                    "value": float(p.value),
                }
                for p in batch
            ]
            outcome = self._post(self.tsdb_path, body, deadline=deadline)
            if outcome.in_doubt:
                in_doubt.extend(batch)
            if not outcome.ok:
                partial = result()
                retry_at = None
                if outcome.out_of_time and outcome.retry_after is not None:
                    waited = timedelta(seconds=self._monotonic() - started)
                    retry_at = self._clock() + waited + timedelta(seconds=outcome.retry_after)
                log.error(
                    "mackerel_export_failed",
                    service=self.service,
                    status=outcome.status,
                    sent=sent,
                    pending=len(fresh) - sent,
                    in_doubt=len(in_doubt),
                    out_of_time=outcome.out_of_time,
                    retry_at=retry_at.isoformat() if retry_at else None,
                    sent_until=partial.last_time.isoformat() if partial.last_time else None,
                )
                raise MackerelError(
                    _failure(self.tsdb_path, outcome, pending=len(fresh) - sent),
                    status=outcome.status, sent_until=partial.last_time, sent=sent,
                    partial=partial, retry_at=retry_at,
                )  # fmt: skip
            sent += len(batch)
            batches += 1
        done = result()
        if in_doubt:
            log.warning("mackerel_points_in_doubt", service=self.service, count=len(in_doubt))
        log.info(
            "mackerel_exported",
            service=self.service,
            sent=sent,
            batches=batches,
            skipped_old=len(old),
            last_time=done.last_time.isoformat() if done.last_time else None,
        )
        return done

    def post_graph_definitions(self, *, deadline: float | None = None) -> bool:
        """Post :func:`graph_definitions`; ``True`` on success, for the caller to record.

        Raises :class:`MackerelError` (``sent_until`` is ``None``) when Mackerel refuses or the
        ``deadline`` comes first.
        """
        path = "/api/v0/graph-defs/create"
        outcome = self._post(path, graph_definitions(), deadline=deadline)
        if not outcome.ok:
            raise MackerelError(_failure(path, outcome), status=outcome.status, sent_until=None)
        log.info("mackerel_graph_definitions_posted", graphs=len(graph_definitions()))
        return True

    def _timeout(self, left: float) -> httpx.Timeout:
        """The client's timeouts, each cut to ``left`` seconds."""
        base = self._client.timeout

        def cut(value: float | None) -> float:
            return left if value is None else min(value, left)

        return httpx.Timeout(connect=cut(base.connect), read=cut(base.read),
                             write=cut(base.write), pool=cut(base.pool))

    def _post(self, path: str, body: list[dict[str, Any]], *,
              deadline: float | None) -> _Outcome:
        """POST ``body`` as JSON, retrying 429, 5xx and connection errors until ``deadline``."""
        url = self.base_url + path
        content = json.dumps(body, allow_nan=False).encode()
        headers = {"X-Api-Key": self._api_key, "Content-Type": "application/json"}
        reason = ""
        status: int | None = None
        in_doubt = out_of_time = False
        retry_after: float | None = None
        attempt = 0
        while attempt < self.max_attempts:
            left = None if deadline is None else deadline - self._monotonic()
            if left is not None and left < _MIN_ATTEMPT_S:
                out_of_time = True
                break
            attempt += 1
            wait = self.backoff_s * 2 ** (attempt - 1)
            timeout: Any = httpx.USE_CLIENT_DEFAULT if left is None else self._timeout(left)
            try:
                response = self._client.post(url, content=content, headers=headers,
                                             timeout=timeout)
            except httpx.TransportError as exc:
                status, reason = None, f"connection error ({type(exc).__name__})"
                if not isinstance(exc, _NOT_SENT):
                    in_doubt = True  # sent, then cut off: Mackerel may still apply it
            else:
                status = response.status_code
                if response.is_success:
                    return _Outcome(ok=True, status=status, reason="", attempts=attempt,
                                    in_doubt=in_doubt, out_of_time=False,
                                    retry_after=retry_after)
                reason = f"HTTP {status}"
                detail = _one_line(response.text.replace(self._api_key, "***"))
                if detail:
                    reason += f" ({detail})"
                if status != 429 and status < 500:
                    break  # a request Mackerel will never accept: retrying cannot help
                retry_after = _retry_after(response)
                wait = retry_after or wait
            if attempt >= self.max_attempts:
                break
            if deadline is not None and self._monotonic() + wait >= deadline:
                out_of_time = True  # the next try belongs to the next pass
                break
            log.warning(
                "mackerel_retry",
                path=path,
                attempt=attempt,
                status=status,
                wait_s=wait,
            )
            self._sleep(wait)
        return _Outcome(ok=False, status=status, reason=reason, attempts=attempt,
                        in_doubt=in_doubt, out_of_time=out_of_time, retry_after=retry_after)


def _failure(path: str, outcome: _Outcome, *, pending: int | None = None) -> str:
    """A one-line message for a failed POST (never the key: ``reason`` has it masked)."""
    if outcome.attempts == 0:
        message = f"Mackerel POST {path} not tried: the pass ran out of time"
    else:
        tries = "once" if outcome.attempts == 1 else f"after {outcome.attempts} attempts"
        message = f"Mackerel POST {path} failed {tries}: {outcome.reason}"
        if outcome.out_of_time:
            message += "; the pass ran out of time"
    if outcome.out_of_time and pending:
        message += f", {pending} points wait for the next pass"
    return message


def _sent_until(fresh: Sequence[MetricPoint], sent: int) -> datetime | None:
    """The newest time *T* with every point at or before *T* among the first ``sent``.

    A batch may end inside a timestamp; that timestamp is then not fully delivered.
    """
    if sent == 0:
        return None
    last = fresh[sent - 1].time
    if sent < len(fresh) and fresh[sent].time == last:
        earlier = [p.time for p in fresh[:sent] if p.time < last]
        return earlier[-1] if earlier else None
    return last
