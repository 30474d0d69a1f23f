"""Errors raised by the jobs package.

The tree::

    JobError
    ├── UnknownJob       no job of that name is registered
    ├── BadTrigger       a trigger (shard, event payload, option) is malformed
    └── JobFailed        a run ended failed or partial (carries ``status`` and ``run_id``)
"""

from __future__ import annotations

from typing import Any

__all__ = ["BadTrigger", "JobError", "JobFailed", "UnknownJob"]


class JobError(Exception):
    """Root of every error the jobs package raises on purpose."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def __str__(self) -> str:
        return self.message


class UnknownJob(JobError):
    """No job of that name is registered."""


class BadTrigger(JobError):
    """A trigger is malformed (bad shard, bad event payload, an option the job does not take)."""


class JobFailed(JobError):
    """A run ended ``failed`` or ``partial``."""
