"""A small, seeded month of usage as JSON Lines (what `hostmeter ingest` reads), big enough that
each command takes a second or two on this workload: long enough to be killed mid-way."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from pathlib import Path

from metering.settings import Settings
from metering.timeutil import hours_between, month_bounds

__all__ = ["PERIOD", "write_usage"]

PERIOD = "2026-02"


def write_usage(path: Path, *, seed: int, tenants: int = 6, hosts: int = 5,
                posts_per_hour: int = 1, metrics: int = 24) -> int:
    """Write the month's records to ``path``; returns the number of lines."""
    rng = random.Random(seed)
    start, end = month_bounds(PERIOD, Settings().zone)
    lines: list[str] = []

    def emit(record: dict[str, object]) -> None:
        lines.append(json.dumps(record, separators=(",", ":")))

    for t in range(tenants):
        tenant = f"acme-{t:02d}"
        plan = "free" if t % 4 == 3 else "standard"
        emit({"type": "plan", "tenant": tenant, "plan": plan, "at": start.isoformat()})
        if t % 3 == 0:
            emit({"type": "monitor", "tenant": tenant, "monitor": "m-1", "state": "created",
                  "at": (start + timedelta(days=2, minutes=30)).isoformat()})
        if t % 4 == 1:
            emit({"type": "anomaly_role", "tenant": tenant, "role": "web:app", "enabled": True,
                  "at": start.isoformat()})
            emit({"type": "role_member", "tenant": tenant, "role": "web:app", "host": "h-0",
                  "member": True, "at": start.isoformat()})
    for hour in hours_between(start, end):
        for t in range(tenants):
            tenant = f"acme-{t:02d}"
            for h in range(hosts):
                if (h + hour.day) % 7 == 6:  # some hosts skip some days
                    continue
                kind = "micro" if h % 3 == 2 else "standard"
                for p in range(posts_per_hour):
                    names = [f"m.{(k + p * rng.randrange(3)) % (metrics * 2)}"
                             for k in range(metrics)]
                    emit({"type": "host_post", "tenant": tenant, "host": f"h-{h}", "kind": kind,
                          "at": (hour + timedelta(minutes=p * 17 + 3)).isoformat(),
                          "metrics": names})
            if t % 2 == 0:
                emit({"type": "service_post", "tenant": tenant, "service": "web",
                      "at": (hour + timedelta(minutes=5)).isoformat(),
                      "metrics": [f"req.{k}" for k in range(3 + hour.hour % 4)]})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)
