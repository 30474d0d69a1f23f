"""Refresh ``docs/dashboard.png``, the README's dashboard screenshot.

    python docs/dashboard_screenshot.py [--out docs/dashboard.png] [--height 3500]

In a throwaway directory (its own SQLite database and log directory) it runs, as a user would:

1. ``hostmeter demo`` — a synthetic fleet, the previous month snapshotted, closed and invoiced;
2. simulated job logs for the demo's tenants from the hour after the demo's month (at most two
   weeks back) to the last full hour, so they go on where the demo's own lines stop: one
   ``tenant_hour`` line per tenant-hour (hosts and metrics: a daily cycle on a slow rise, one
   tenant scaling up over the last day, one new tenant, two spikes that get flagged as noisy
   neighbours), one ``tenant_ingested`` line per tenant-hour (posts), and an hourly
   ``snapshot-usage`` ``job_finished`` line (two runs that processed fewer tenants than they
   expected) — the lines the jobs write, seeded, so every panel has something to show;
3. ``hostmeter metrics aggregate`` and ``hostmeter dashboard --out``;
4. headless Chromium (``/usr/bin/chromium``; ``apt-get install -y chromium``) screenshots the
   page at 1280 px wide and ``--height`` px tall (raise it when the page grows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
DAYS = 14


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _line(event: str, at: datetime, job: str, run_id: str, **fields: object) -> str:
    return json.dumps({"event": event, "level": "info", "timestamp": _iso(at), "job": job,
                       "run_id": run_id, "logical_time": _iso(at), **fields}) + "\n"


def fleet_base(db_path: Path) -> tuple[datetime, dict[str, tuple[int, int]]]:
    """The demo's last snapshotted hour, and tenant → (hosts, metrics) in it."""
    with sqlite3.connect(db_path) as conn:
        [(last,)] = conn.execute("SELECT max(hour) FROM usage_snapshots").fetchall()
        rows = conn.execute(
            "SELECT t.key, u.standard_hosts + u.micro_hosts, u.host_metrics "
            "FROM usage_snapshots u JOIN tenants t ON t.id = u.tenant_id "
            "WHERE u.hour = ?", (last,)).fetchall()
    hour = datetime.fromisoformat(last).replace(tzinfo=UTC)
    return hour, {key: (int(hosts), int(metrics)) for key, hosts, metrics in rows if hosts}


def simulated_logs(base: dict[str, tuple[int, int]], start: datetime, end: datetime) -> str:
    """Per-item and snapshot-usage lines for the hours from ``start`` to ``end``."""
    rng = random.Random(7)
    tenants = sorted(base)
    largest = max(tenants, key=lambda t: base[t][0])
    by_size = sorted(tenants, key=lambda t: (base[t][0], t))
    spiky = by_size[len(by_size) // 2]  # hosts x4 for an hour, a day and a half ago
    noisy = by_size[len(by_size) * 3 // 4]  # metrics x5 in the latest hour but two
    n = int((end - start) / timedelta(hours=1)) + 1
    hours = [start + timedelta(hours=h) for h in range(n)]
    out = []
    for i, hour in enumerate(hours):
        left = len(hours) - 1 - i  # hours before the latest
        day = 1 + 0.15 * math.sin((hour.hour - 9) / 24 * 2 * math.pi)
        names = [*tenants, "tenant-new"] if left < 10 else tenants
        for tenant in names:
            hosts, metrics = base.get(tenant, (18, 2_100))
            scale = (1 + 0.3 * i / len(hours)) * (day if hosts >= 8 else 1)
            if tenant == largest and left < 24:
                scale *= 1 + 0.5 * (24 - left) / 24  # scaling up over the last day
            h = max(1, round(hosts * scale))
            m = max(1, round(metrics * scale * rng.uniform(0.97, 1.03)))
            if tenant == spiky and left == 36:
                h *= 4
            if tenant == noisy and left == 2:
                m *= 5
            logged = hour + timedelta(hours=1, minutes=1)
            out.append(_line("tenant_hour", logged, "snapshot-usage", f"sim-{i}",
                             tenant=tenant, hour=_iso(hour), std=h, micro=0, metrics=m))
            out.append(_line("tenant_ingested", hour + timedelta(minutes=rng.randrange(60)),
                             "ingest", f"sim-ingest-{i}", tenant=tenant,
                             posts=round(h * 60 * rng.uniform(0.9, 1.1))))
        short = 2 if left in (1, 50) else 0
        out.append(_line("job_finished", hour + timedelta(hours=1, minutes=1, seconds=40),
                         "snapshot-usage", f"sim-{i}", status="partial" if short else "succeeded",
                         duration_s=round(3.2 + 0.02 * len(names) + rng.random(), 2),
                         error="2 tenants timed out" if short else None,
                         tenants_expected=len(names), tenants_processed=len(names) - short,
                         tenants_failed=short))
    return "".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--height", type=int, default=3500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "HOSTMETER_DATABASE_URL": f"sqlite:///{work / 'hostmeter.db'}",
               "HOSTMETER_LOG_DIR": str(work / "logs")}

        def hostmeter(*argv: str) -> None:
            done = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], env=env, cwd=work,
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"hostmeter {' '.join(argv)} failed:\n{done.stderr[-2000:]}")

        hostmeter("demo")
        end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
        last, base = fleet_base(work / "hostmeter.db")
        start = max(last + timedelta(hours=1), end - timedelta(days=DAYS) + timedelta(hours=1))
        (work / "logs" / "simulated.jsonl").write_text(simulated_logs(base, start, end))
        hostmeter("metrics", "aggregate")
        hostmeter("dashboard", "--out", str(work / "dashboard.html"))
        profile = work / "chromium"
        subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--force-device-scale-factor=1", "--no-first-run", f"--user-data-dir={profile}",
             f"--screenshot={args.out.resolve()}", f"--window-size=1280,{args.height}",
             (work / "dashboard.html").as_uri()],
            check=True, capture_output=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
