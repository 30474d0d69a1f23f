"""Bench tiers (the fleet sizes), the bench's own error, and the progress protocol it reports
through (the command line passes rich bars; everything else gets :func:`no_progress`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from jobs.runtime.errors import JobError

__all__ = [
    "BENCH_PREFIX",
    "DEFAULT_PERIOD",
    "SNAPSHOT_RUN_PREFIX",
    "TIERS",
    "BenchRefused",
    "BenchTier",
    "Progress",
    "no_progress",
]

DEFAULT_PERIOD = "2026-10"
BENCH_PREFIX = "bench-"
SNAPSHOT_RUN_PREFIX = "bench-"

Progress = Callable[[str, int | None], Any]
"""A progress factory: ``progress(description, total)`` is a context manager yielding
``update(done, total=None)`` (the command line passes :func:`jobs.cli.console.progress`)."""


@contextmanager
def no_progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A :data:`Progress` factory that shows nothing."""

    def ignore(done: int, new_total: int | None = None) -> None:
        return None

    yield ignore


class BenchRefused(JobError):
    """The database holds data that is not bench data; bench writes nothing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchTier:
    """The size of one bench run."""

    name: str
    tenants: int
    hosts: int
    hours: int | None = None
    """Hours of the month to generate and snapshot, from its start; ``None``: all of them."""
    ingest_tenants: int
    ingest_hosts_per_tenant: int
    ingest_hours: int
    ingest_posts_per_host_hour: int
    """At most 60: one post a minute, as an agent does."""
    metrics_per_post: int = 100
    posts_per_call: int = 1000
    """Posts per :meth:`UsageRecorder.record` call (one transaction) in the batched sample."""
    single_posts: int = 100
    """Posts sent one per call (one transaction each): the latency of a lone post."""
    file_tenants: int = 0
    file_hosts: int = 0
    """The JSON Lines file of agent posts timed through ``hostmeter ingest`` beside a bare
    parse (:mod:`jobs.synthetic.bench.posts`): every one of ``file_hosts`` hosts (over
    ``file_tenants`` skewed tenants) posts every minute for ``file_hours`` hours."""
    file_hours: int = 1
    hot_hosts: int = 0
    """Hosts that post a whole hour (one post a minute, :mod:`jobs.synthetic.bench.posts`'s
    names) through the Redis hot path (:mod:`jobs.synthetic.bench.hotpath`); 0: no hot path."""
    hot_tenants: int = 1
    hot_single_posts: int = 1000
    """The hour's last posts, sent one call (one round trip) each; the rest are pipelined."""
    hot_direct_posts: int = 200
    """Posts through today's direct path (one transaction each), the hot path's baseline."""
    fill_month: bool = False
    """Snapshot only the first ``hours`` hours of recorded usage, then copy that day's
    snapshots over the rest of the month, so that the close runs on a whole month without a
    month of ``host_hours`` (which would not fit the machine at 300,000 hosts)."""

    @property
    def ingest_posts(self) -> int:
        return (
            self.ingest_tenants * self.ingest_hosts_per_tenant * self.ingest_hours
            * self.ingest_posts_per_host_hour
        )


TIERS: dict[str, BenchTier] = {
    "small": BenchTier(
        name="small", tenants=20, hosts=200, ingest_tenants=2, ingest_hosts_per_tenant=5,
        ingest_hours=4, ingest_posts_per_host_hour=50, posts_per_call=500, single_posts=50,
        file_tenants=10, file_hosts=100,
        hot_tenants=100, hot_hosts=2_000, hot_single_posts=2_000, hot_direct_posts=200,
    ),
    "medium": BenchTier(
        name="medium", tenants=2_000, hosts=30_000, ingest_tenants=5, ingest_hosts_per_tenant=20,
        ingest_hours=10, ingest_posts_per_host_hour=50, posts_per_call=1000, single_posts=500,
        file_tenants=100, file_hosts=1_000,
        hot_tenants=1_000, hot_hosts=20_000, hot_single_posts=5_000, hot_direct_posts=500,
    ),
    # The size of the service hostmeter models: 20,000 tenants, 300,000 hosts (tenant 1 has
    # ~2,000 of them). A day of host_hours (7.2 M rows) is snapshotted; the month is filled
    # from that day for the close (PostgreSQL; SQLite is measured up to medium).
    "large": BenchTier(
        name="large", tenants=20_000, hosts=300_000, hours=24, fill_month=True,
        ingest_tenants=5, ingest_hosts_per_tenant=20, ingest_hours=10,
        ingest_posts_per_host_hour=50, posts_per_call=1000, single_posts=500,
        file_tenants=500, file_hosts=5_000,
        hot_tenants=5_000, hot_hosts=100_000, hot_single_posts=5_000, hot_direct_posts=500,
    ),
}


