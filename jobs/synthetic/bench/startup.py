"""Start-up cost: what a process pays before it does any work, beside a floor measured in the
same run.

Every ECS task and every Lambda cold start is a new Python process, so the imports of the entry
point are paid on every scheduled run. Each path below is a fresh interpreter, timed from spawn
to exit (wall clock), repeated ``repeats`` times with the paths interleaved (so a noisy moment
hits every path alike); the report gives the median and the minimum, and the median's ratio to
the floor's:

- ``floor``: ``python -c "import sqlalchemy, click"`` — the two libraries every entry point
  needs; nothing of ours;
- ``help``: ``hostmeter --help`` (the console script);
- ``lambda_import``: ``import jobs.triggers.aws_lambda`` — what Lambda does at a cold start;
- ``run``: ``hostmeter run snapshot-usage --at … --lookback 0 --force`` on a scratch SQLite file
  whose schema is already there: what a scheduled ECS task runs, including its work (one empty
  hour) and its writes (ledger, snapshot, log file);
- ``lambda_invoke``: the import plus one handler invocation for ``snapshot-usage`` (a new hour
  each time, so each one does the work).

Each path also reports which heavy libraries it imported (pandas, numpy, rich, httpx,
prometheus-client, boto3, APScheduler, structlog, Alembic): those it pays for.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from jobs.runtime.errors import JobError
from jobs.synthetic.bench.tiers import Progress, no_progress

__all__ = ["HEAVY", "StartupTiming", "hostmeter_argv", "time_startup"]

HEAVY = ("pandas", "numpy", "rich", "httpx", "prometheus_client", "boto3", "apscheduler",
         "structlog", "alembic")
"""Libraries an entry point should import only when it uses them."""

GOAL_RATIO = 1.5
"""``help`` and ``lambda_import`` should cost at most this many times the floor."""

_FIRST_HOUR = datetime(2026, 10, 15, 10, 5, tzinfo=UTC)

_REPORT_IMPORTS = (
    "import sys, json; print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class StartupTiming:
    """Wall-clock seconds of each start-up path, one list per path, in run order."""

    seconds: dict[str, list[float]]
    imports: dict[str, list[str]]
    commands: dict[str, str]

    def median(self, path: str) -> float:
        return statistics.median(self.seconds[path])

    def as_dict(self) -> dict[str, Any]:
        floor = self.median("floor")
        paths: dict[str, Any] = {}
        for name, values in self.seconds.items():
            paths[name] = {
                "median_s": round(statistics.median(values), 3),
                "min_s": round(min(values), 3),
                "ratio": round(statistics.median(values) / floor, 2) if floor else None,
                "heavy_imports": self.imports.get(name, []),
                "command": self.commands[name],
            }
        return {
            "repeats": len(self.seconds["floor"]),
            "goal_ratio": GOAL_RATIO,
            "paths": paths,
            "goal_met": {name: paths[name]["ratio"] is not None
                         and paths[name]["ratio"] <= GOAL_RATIO
                         for name in ("help", "lambda_import")},
        }


def hostmeter_argv() -> list[str]:
    """The console script beside this interpreter (a venv's bin/), else ``python -m jobs.cli``."""
    script = Path(sys.executable).with_name("hostmeter")
    return [str(script)] if script.exists() else [sys.executable, "-m", "jobs.cli"]


def _timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise JobError(f"start-up path failed ({' '.join(argv)}): {' / '.join(tail)}")
    return seconds, proc.stdout


def time_startup(*, repeats: int = 7, progress_factory: Progress = no_progress) -> StartupTiming:
    """Time every start-up path ``repeats`` times, interleaved, in a scratch directory.

    Writes nothing outside a temporary directory (its own SQLite file and log directory).
    """
    py = sys.executable
    heavy_report = _REPORT_IMPORTS.format(heavy=HEAVY)
    with tempfile.TemporaryDirectory(prefix="hostmeter-startup-") as tmp:
        cwd = Path(tmp)
        env = {**os.environ, "HOSTMETER_DATABASE_URL": f"sqlite:///{cwd / 'startup.db'}",
               "HOSTMETER_LOG_DIR": str(cwd / "logs")}
        env.pop("HOSTMETER_DATABASE_URL_SECRET_ARN", None)
        env.pop("HOSTMETER_DATABASE_URL_SSM_PARAMETER", None)
        at = _FIRST_HOUR.isoformat()
        invoke = ("import jobs.triggers.aws_lambda as h; h.handler({{'job': 'snapshot-usage', "
                  "'scheduled_time': '{at}'}}, None)")
        run_args = ["run", "snapshot-usage", "--at", at, "--lookback", "0", "--force",
                    "--format", "json"]
        paths: dict[str, list[str]] = {
            "floor": [py, "-c", "import sqlalchemy, click"],
            "help": [*hostmeter_argv(), "--help"],
            "lambda_import": [py, "-c", "import jobs.triggers.aws_lambda"],
            "run": [*hostmeter_argv(), *run_args],
            "lambda_invoke": [py, "-c", invoke.format(at=at)],
        }
        # The schema first (not timed): a scheduled task meets a migrated database.
        _timed([*hostmeter_argv(), "db", "upgrade"], env, cwd)
        main = ("import sys; sys.argv = ['hostmeter', *{args!r}]\n"
                "try:\n    import jobs.cli; jobs.cli.main()\nexcept SystemExit:\n    pass\n")
        imports = {
            "floor": [py, "-c", f"import sqlalchemy, click; {heavy_report}"],
            "help": [py, "-c", main.format(args=["--help"]) + heavy_report],
            "lambda_import": [py, "-c", f"import jobs.triggers.aws_lambda; {heavy_report}"],
            "run": [py, "-c", main.format(args=run_args) + heavy_report],
            "lambda_invoke": [py, "-c", f"{invoke.format(at=at)}; {heavy_report}"],
        }
        seen = {name: json.loads(_timed(argv, env, cwd)[1].strip().splitlines()[-1])
                for name, argv in imports.items()}
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        with progress_factory("startup", repeats * len(paths)) as update:
            done = 0
            for i in range(repeats):
                for name, argv in paths.items():
                    if name == "lambda_invoke":  # a new hour each time: each invocation works
                        hour = _FIRST_HOUR + timedelta(hours=i + 1)
                        argv = [py, "-c", invoke.format(at=hour.isoformat())]
                    seconds[name].append(_timed(argv, env, cwd)[0])
                    done += 1
                    update(done)
        commands = {name: " ".join(Path(a).name if a == py or a.endswith("hostmeter") else a
                                   for a in argv) for name, argv in paths.items()}
    return StartupTiming(seconds=seconds, imports=seen, commands=commands)
