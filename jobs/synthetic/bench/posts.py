"""The real ingest path, measured: a JSON Lines file of agent posts through ``hostmeter ingest``,
beside the floor of parsing the same file.

:func:`write_posts` writes what a fleet of agents sends: every host posts every minute, about
``metrics_per_post`` names a post, 90 % of them the same every minute and the rest rotating
through a larger pool (so some posts add bits to their hour and most do not); hosts are spread
over tenants with a skew (a few tenants hold many hosts); one in four hosts is ``micro``.

:func:`parse_floor` is what any ingest must at least do with that file: read every line, decode
its JSON (the standard library's ``json.loads``, the decoder a plain Python program would use)
and keep the set of metric names per (tenant, host, UTC hour). :func:`time_ingest_file` runs
``hostmeter ingest FILE`` as a user would (a new process, start-up included) against the
configured database and reports both, and their ratio (floor time / ingest time: ≥ 1.0 means
ingest keeps up with a bare parse). :func:`time_parallel` then writes the same fleet again under
new tenant names, split by tenant into two files, and times two ``hostmeter ingest`` processes
on them at once beside one process on the whole of it (PostgreSQL: ingests of different tenants
do not wait for each other).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from jobs.runtime.errors import JobError

__all__ = ["Agent", "ParallelTiming", "PostsFile", "PostsTiming", "agents", "parse_floor",
           "posted_names", "time_ingest_file", "time_parallel", "write_posts"]

_BASE = ("loadavg1", "loadavg5", "loadavg15", "cpu.user.percentage", "cpu.system.percentage",
         "cpu.iowait.percentage", "memory.used", "memory.free", "memory.cached",
         "disk.sda.reads.delta", "disk.sda.writes.delta", "interface.eth0.rxBytes.delta",
         "interface.eth0.txBytes.delta", "filesystem.root.used", "filesystem.root.size")


@dataclass(frozen=True, slots=True, kw_only=True)
class PostsFile:
    """A written file of posts and what it holds."""

    path: Path
    lines: int
    observations: int
    bytes: int
    tenants: int
    hosts: int
    hours: int


def _names(host: int, count: int) -> list[str]:
    return list(_BASE) + [f"custom.app{host % 11}.metric{i:04d}"
                          for i in range(count - len(_BASE))]


@dataclass(frozen=True, slots=True)
class Agent:
    """One host's agent in a generated fleet: its tenant, host, kind and the names it posts
    from (:func:`posted_names` picks a minute's)."""

    tenant: str
    host: str
    kind: str
    pool: list[str]


def agents(*, tenants: int, hosts: int, metrics_per_post: int = 100,
           prefix: str = "bench-post", part: tuple[int, int] | None = None) -> list[Agent]:
    """The fleet: host ``n`` is ``<prefix>-h<n>``; the first ``tenants`` hosts each go to their
    own tenant ``<prefix>-t<n>``, the rest to skewed tenants (low numbers are big); one in four
    hosts is ``micro``. With ``part=(i, n)`` only the hosts of the tenants numbered ``t`` with
    ``t % n == i``. Hosts with the same name pool share one list."""
    steady = metrics_per_post * 9 // 10
    count = steady + 3 * (metrics_per_post - steady)
    pools: dict[int, list[str]] = {}
    fleet = []
    for n in range(hosts):
        # skew: host n goes to tenant ⌊t·(n/hosts)²⌋, so low tenants are big
        t = min(tenants - 1, int(tenants * (n / hosts) ** 2)) if n >= tenants else n
        if part is not None and t % part[1] != part[0]:
            continue
        pool = pools.get(n % 11)
        if pool is None:
            pool = pools[n % 11] = _names(n, count)
        fleet.append(Agent(f"{prefix}-t{t}", f"{prefix}-h{n}",
                           "micro" if n % 4 == 3 else "standard", pool))
    return fleet


_T = TypeVar("_T")


def posted_names(pool: list[_T], minute: int, metrics_per_post: int = 100) -> list[_T]:
    """The names an agent posts at ``minute``: 90 % the same every minute, the rest rotating
    through the pool (so some posts add names to their hour and most do not)."""
    steady = metrics_per_post * 9 // 10
    rotating = metrics_per_post - steady
    r = steady + (minute * rotating) % (2 * rotating)
    return pool[:steady] + pool[r : r + rotating]


def write_posts(path: Path, *, tenants: int, hosts: int, start: datetime, hours: int,
                metrics_per_post: int = 100, prefix: str = "bench-post",
                part: tuple[int, int] | None = None) -> PostsFile:
    """Write every host's post for every minute of ``hours`` hours from ``start``; with
    ``part=(i, n)`` only the hosts of the tenants numbered ``t`` with ``t % n == i``
    (:func:`agents`)."""
    fleet = agents(tenants=tenants, hosts=hosts, metrics_per_post=metrics_per_post,
                   prefix=prefix, part=part)
    observations = lines = 0
    with path.open("w", encoding="utf-8") as f:
        for minute in range(hours * 60):
            at = (start + timedelta(minutes=minute, seconds=7)).isoformat()
            for a in fleet:
                metrics = posted_names(a.pool, minute, metrics_per_post)
                f.write(json.dumps({"type": "host_post", "tenant": a.tenant, "host": a.host,
                                    "kind": a.kind, "at": at, "metrics": metrics},
                                   separators=(",", ":")))
                f.write("\n")
                observations += len(metrics)
                lines += 1
    return PostsFile(path=path, lines=lines, observations=observations,
                     bytes=path.stat().st_size, tenants=len({a.tenant for a in fleet}),
                     hosts=len(fleet), hours=hours)


def parse_floor(path: Path) -> tuple[float, int]:
    """Seconds to decode every line with ``json.loads`` and keep the set of names per (tenant,
    host, hour); also returns the number of distinct (tenant, host, hour) keys (a check)."""
    seen: dict[tuple[str, str, str], set[str]] = {}
    started = time.perf_counter()
    with path.open("rb") as f:
        for line in f:
            rec = json.loads(line)
            key = (rec["tenant"], rec["host"], rec["at"][:13])
            names = seen.get(key)
            if names is None:
                names = seen[key] = set()
            names.update(rec["metrics"])
    return time.perf_counter() - started, len(seen)


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestRun:
    """One ``hostmeter ingest FILE`` process."""

    seconds: float
    peak_rss_mib: float | None
    summary: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class PostsTiming:
    """``hostmeter ingest FILE`` beside the parse floor of the same file: the first hour of a
    new fleet (tenants, hosts and their dictionaries created), the next hour of the same fleet
    (the steady state of a live service: known names, new host-hours), and that hour again
    (idempotent: nothing written)."""

    file: PostsFile
    floor_s: float
    floor_peak_rss_mib: float | None
    host_hours: int
    cold: IngestRun
    ingest: IngestRun
    reingest: IngestRun

    def as_dict(self) -> dict[str, Any]:
        f = self.file

        def ratio(run: IngestRun) -> float | None:
            return round(self.floor_s / run.seconds, 3) if run.seconds else None

        return {
            "lines": f.lines, "observations": f.observations, "mib": round(f.bytes / 2**20, 1),
            "tenants": f.tenants, "hosts": f.hosts, "hours": f.hours,
            "host_hours": self.host_hours,
            "floor": "json.loads per line + a set of names per (tenant, host, hour), in process",
            "floor_s": round(self.floor_s, 3),
            "ingest": "hostmeter ingest FILE --format json, a new process (start-up included), "
                      "the fleet's second hour",
            "ingest_s": round(self.ingest.seconds, 3),
            "ratio": ratio(self.ingest),
            "observations_per_s": (round(f.observations / self.ingest.seconds)
                                   if self.ingest.seconds else None),
            "rows_written": self.ingest.summary.get("rows_written"),
            "peak_rss_mib": self.ingest.peak_rss_mib,
            "first_hour_s": round(self.cold.seconds, 3),
            "first_hour_ratio": ratio(self.cold),
            "first_hour_rows_written": self.cold.summary.get("rows_written"),
            "first_hour_peak_rss_mib": self.cold.peak_rss_mib,
            "reingest_s": round(self.reingest.seconds, 3),
            "reingest_ratio": ratio(self.reingest),
            "reingest_rows_written": self.reingest.summary.get("rows_written"),
            "summary": self.ingest.summary,
        }


def _ingest(path: Path, database_url: str) -> IngestRun:
    """``hostmeter ingest FILE --format json`` in a new process: its wall time, its summary and
    its own peak resident size (:func:`~jobs.synthetic.bench.memory.run_hostmeter`)."""
    from jobs.synthetic.bench.memory import run_hostmeter

    seconds, peak, summary = run_hostmeter(
        "ingest", str(path), env={**os.environ, "HOSTMETER_DATABASE_URL": database_url},
        what=f"hostmeter ingest {path.name}")
    return IngestRun(seconds=seconds, peak_rss_mib=peak, summary=summary)


def time_ingest_file(first: PostsFile, second: PostsFile, database_url: str) -> PostsTiming:
    """``hostmeter ingest`` (a new process each time) of the fleet's ``first`` hour, then its
    ``second`` hour beside the floor of parsing that file, then the ``second`` again (it must
    write nothing)."""
    from jobs.synthetic.bench.memory import PeakRSS

    cold = _ingest(first.path, database_url)
    with PeakRSS() as peak:
        floor_s, host_hours = parse_floor(second.path)
    warm = _ingest(second.path, database_url)
    again = _ingest(second.path, database_url)
    if again.summary.get("rows_written"):
        raise JobError(f"re-ingesting the same file wrote {again.summary['rows_written']} rows")
    return PostsTiming(file=second, floor_s=floor_s, floor_peak_rss_mib=peak.mib,
                       host_hours=host_hours, cold=cold, ingest=warm, reingest=again)


@dataclass(frozen=True, slots=True, kw_only=True)
class ParallelTiming:
    """Two ingest processes on disjoint tenants at once, beside one process on all of them."""

    one_s: float
    two_s: float
    parts: list[int]
    rows_written: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "what": "the fleet under new tenant names, its first hour ingested untimed; then "
                    "its second hour: one hostmeter ingest on the whole file, and (another "
                    "copy of the fleet) two at once on its halves, split by tenant",
            "one_process_s": round(self.one_s, 3),
            "two_processes_s": round(self.two_s, 3),
            "speedup": round(self.one_s / self.two_s, 2) if self.two_s else None,
            "lines_per_part": self.parts,
            "rows_written": self.rows_written,
        }


def time_parallel(directory: Path, database_url: str, *, tenants: int, hosts: int,
                  start: datetime, hours: int) -> ParallelTiming:
    """One process on a fleet's second hour, then two processes at once on the halves of
    another copy of the fleet's second hour (both copies had their first hour ingested first,
    untimed: the steady state of a live service)."""

    def files(hour: int) -> tuple[PostsFile, list[PostsFile]]:
        at = start + timedelta(hours=hour * hours)
        whole = write_posts(directory / f"one{hour}.jsonl", tenants=tenants, hosts=hosts,
                            start=at, hours=hours, prefix="bench-one")
        halves = [write_posts(directory / f"two{hour}-{i}.jsonl", tenants=tenants, hosts=hosts,
                              start=at, hours=hours, prefix="bench-two", part=(i, 2))
                  for i in range(2)]
        return whole, halves

    first, first_halves = files(0)
    for f in (first, *first_halves):
        _ingest(f.path, database_url)  # the fleet's first hour: tenants, hosts, dictionaries
        f.path.unlink()
    whole, halves = files(1)
    one = _ingest(whole.path, database_url)
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda f: _ingest(f.path, database_url), halves))
    two_s = time.perf_counter() - started
    written = sum(int(r.summary.get("rows_written", 0)) for r in runs)
    if written != one.summary.get("rows_written"):
        raise JobError(f"two processes wrote {written} rows, one process "
                       f"{one.summary.get('rows_written')}: the halves do not add up")
    for f in (whole, *halves):
        f.path.unlink()
    return ParallelTiming(one_s=one.seconds, two_s=two_s, parts=[h.lines for h in halves],
                          rows_written=written)
