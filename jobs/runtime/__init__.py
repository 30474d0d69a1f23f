"""What every job run stands on: the job context and telemetry (:mod:`~.context`), the run
ledger (:mod:`~.ledger`), key locks (:mod:`~.locks`), logging set-up (:mod:`~.logconfig`) and
the jobs package's errors (:mod:`~.errors`). The bottom layer of ``jobs``."""
