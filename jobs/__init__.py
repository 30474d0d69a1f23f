"""hostmeter jobs, in layers (imports only go down; ``lint-imports`` checks it):

- :mod:`jobs.cli` — the ``hostmeter`` command line;
- :mod:`jobs.triggers` — what starts a job (runner and ledger, local scheduler, AWS Lambda),
  beside :mod:`jobs.synthetic` (demo fleet and benchmark);
- :mod:`jobs.registry` — the one table of jobs and schedules;
- one module per job: :mod:`jobs.snapshot_usage`, :mod:`jobs.billing_jobs`
  (close-billing-period, finalize-invoices), :mod:`jobs.aggregate_job_logs`,
  :mod:`jobs.prune_usage`;
- :mod:`jobs.monitoring` — job logs → job metrics → Mackerel, Prometheus, dashboard;
- :mod:`jobs.runtime` — job context, run ledger, locks, logging, errors.
"""
