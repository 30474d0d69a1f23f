"""What starts a job: the runner (run ledger and key locks around one run), the local
APScheduler scheduler, and the AWS Lambda handler. Imported only by :mod:`jobs.cli`."""
