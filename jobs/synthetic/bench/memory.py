"""Peak resident memory of each bench step.

In this process: Linux keeps the peak (``VmHWM`` in ``/proc/self/status``) and resets it when
``5`` is written to ``/proc/self/clear_refs``, so :class:`PeakRSS` reads the peak of exactly
the step it wraps. A child process (``hostmeter ingest``): its own peak, from ``wait4``'s
resource usage. Elsewhere (no ``/proc``) the figures are ``None``, never guessed.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import TracebackType

__all__ = ["PeakRSS", "current_peak_mib", "reset_peak"]

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def reset_peak() -> bool:
    """Start a new peak at the current resident size; ``False`` where that is not possible."""
    try:
        _CLEAR.write_text("5")
    except OSError:
        return False
    return True


def current_peak_mib() -> float | None:
    """This process's peak resident size since the last :func:`reset_peak`, in MiB."""
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
    except OSError:
        return None
    return round(int(found.group(1)) / 1024, 1) if found else None


class PeakRSS:
    """``with PeakRSS() as peak: …`` then ``peak.mib``: the peak resident size of the block."""

    def __init__(self) -> None:
        self.mib: float | None = None
        self._reset = False

    def __enter__(self) -> PeakRSS:
        self._reset = reset_peak()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.mib = current_peak_mib() if self._reset else None
