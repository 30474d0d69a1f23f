"""Errors raised by the jobs package.

The tree::

    JobError
    ├── UnknownJob       no job of that name is registered
    ├── BadTrigger       a trigger (shard, event payload, option) is malformed
    ├── JobFailed        a run ended failed or partial (carries ``status`` and ``run_id``)
    ├── InvalidSchedule  a registry schedule expression cannot be parsed (jobs.triggers.scheduler)
    ├── MackerelError    the Mackerel API refused or could not be reached (jobs.monitoring.mackerel)
    └── AwsError         an AWS API (CloudWatch Logs, SSM, Secrets Manager) refused, could
                         not be reached, or boto3 is missing (jobs.monitoring.cloudwatch,
                         jobs.triggers.aws_lambda)
"""

from __future__ import annotations

from metering.errors import ContextError

__all__ = ["AwsError", "BadTrigger", "JobError", "JobFailed", "UnknownJob"]


class JobError(ContextError):
    """Root of every error the jobs package raises on purpose."""


class UnknownJob(JobError):
    """No job of that name is registered."""


class BadTrigger(JobError):
    """A trigger is malformed (bad shard, bad event payload, an option the job does not take)."""


class JobFailed(JobError):
    """A run ended ``failed`` or ``partial``."""


class AwsError(JobError):
    """An AWS API refused or could not be reached, or boto3 is not installed."""
