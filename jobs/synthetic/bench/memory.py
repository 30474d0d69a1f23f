"""Peak resident memory of each bench step.

In this process: Linux keeps the peak (``VmHWM`` in ``/proc/self/status``) and resets it when
``5`` is written to ``/proc/self/clear_refs``, so :class:`PeakRSS` reads the peak of exactly
the step it wraps, and the resident size it started from (what earlier steps left, such as the
generator's SQLite page cache). A child process (``hostmeter ingest``): its own peak, from
``wait4``'s resource usage, read by a small Python process that starts it — Linux counts into a
child's peak the peak of the process it was started from, so a child of the bench itself would
report the bench's. Elsewhere (no ``/proc``) the figures are ``None``, never guessed.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["MEASURED_CHILD", "PeakRSS", "current_peak_mib", "current_rss_mib", "release_freed",
           "reset_peak", "run_hostmeter"]

MEASURED_CHILD = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "sys.stderr.write(f'\\nhostmeter-bench-peak-rss-kib {usage.ru_maxrss}\\n')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)
"""``python -c MEASURED_CHILD ARGV…`` runs ARGV and writes its own peak resident size (KiB) as
the last line of standard error."""

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def release_freed() -> None:
    """Hand memory that was freed back to the system (glibc's ``malloc_trim``), so that what
    one step freed (the generator's SQLite page cache) does not count in the next step's
    figures; nothing where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


def reset_peak() -> bool:
    """Start a new peak at the current resident size; ``False`` where that is not possible."""
    try:
        _CLEAR.write_text("5")
    except OSError:
        return False
    return True


def _status(field: str) -> float | None:
    try:
        found = re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text())
    except OSError:
        return None
    return round(int(found.group(1)) / 1024, 1) if found else None


def current_peak_mib() -> float | None:
    """This process's peak resident size since the last :func:`reset_peak`, in MiB."""
    return _status("VmHWM")


def current_rss_mib() -> float | None:
    """This process's resident size now, in MiB."""
    return _status("VmRSS")


class PeakRSS:
    """``with PeakRSS() as peak: …`` then ``peak.mib``: the peak resident size of the block;
    ``peak.start_mib``: the resident size it started from."""

    def __init__(self) -> None:
        self.mib: float | None = None
        self.start_mib: float | None = None
        self._reset = False

    def __enter__(self) -> PeakRSS:
        self._reset = reset_peak()
        self.start_mib = current_rss_mib() if self._reset else None
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.mib = current_peak_mib() if self._reset else None


def run_hostmeter(*args: str, env: dict[str, str], what: str) -> tuple[float, float | None, Any]:
    """``hostmeter ARGS… --format json`` in a new process (start-up included), measured by
    :data:`MEASURED_CHILD`: its wall time, its own peak resident size in MiB (``None`` where
    the platform does not say) and its JSON output. Raises :class:`JobError` naming ``what``
    when the command fails."""
    import json
    import subprocess
    import sys
    import time

    from jobs.runtime.errors import JobError
    from jobs.synthetic.bench.startup import hostmeter_argv

    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURED_CHILD, *hostmeter_argv(), *args,
                           "--format", "json"], env=env, capture_output=True, check=False)
    seconds = time.perf_counter() - started
    err = done.stderr.decode("utf-8", "replace").strip().splitlines()
    peak = None
    if err and err[-1].startswith("hostmeter-bench-peak-rss-kib "):
        peak = round(int(err.pop().split()[1]) / 1024, 1)
    if done.returncode != 0:
        raise JobError(f"{what} failed: {err[-1:]}")
    return seconds, peak, json.loads(done.stdout)
