"""The benchmark behind ``hostmeter bench``: time ingest and a month of snapshots on a generated
fleet.

Not a timed test. It writes a synthetic fleet **straight into the configured database** with
set-based SQL, then measures three things and prints one JSON document:

- **generate**: wall time to write the fleet (``generate_s``), step by step;
- **ingest**: metric observations (metric names in posts) per second through
  :meth:`metering.ingest.UsageRecorder.record`, the API of the metric-post path: a sample of
  agent posts (one a minute per host, ~100 names each) in calls of ``posts_per_call`` posts,
  then a few lone posts, one call (one transaction) each;
- **snapshot**: a month of hours through ``snapshot-usage`` (:func:`jobs.snapshot_usage.run`
  under :func:`jobs.runtime.context.run_job`), beside the *floor*: the time of one plain aggregate
  statement that reads the same ``host_hours`` rows, and the ratio of the two.

After the snapshot it checks what cannot be faked: the host count summed over the month's
``usage_snapshots`` equals ``count(*)`` of the month's ``host_hours`` (and the metric sums
agree), every hour of the month is in ``snapshot_hours`` under this run's id, and the generated
row counts equal the planned ones. Any failed check makes the command exit 1. CI runs only the
``small`` tier, for these checks.

The fleet (tenant ``t``, host ``n``; ``mix`` is a multiplicative hash of an integer, so the
same tier always gives the same rows):

- tenants ``bench-t-<t>``; each of the first ``tenants`` hosts goes to its own tenant, the rest
  to skewed tenants (low numbers are large tenants: tenant 1 of ``medium`` has ~600 hosts);
- plans from the first hour: mostly ``standard``; ``t % 20 == 0`` free, ``t % 20 == 10``
  trial, ``t % 20 == 5`` trial converting to standard mid-month, ``t % 25 == 3`` signs up
  (standard) at some hour of the month and has no plan before;
- hosts ``bench-h-<n>``: 80 % standard, 20 % micro; one in ten of each over its metric limit
  (200 standard / 30 micro), with a per-hour wobble of 0–3 metrics; ``n % 10 == 3`` joins
  mid-month and ``n % 10 == 7`` stops posting mid-month, every other host posts every hour;
- ``service_hours`` every hour for ``t % 4 == 1``; 1–5 URL monitors for ``t % 3 == 0``, some
  deleted mid-month; an anomaly-detection role with all its standard hosts for ``t % 50 == 7``.

Generation is set-based SQL only: ``INSERT … SELECT`` from temporary tables of integers and
hours made by ``generate_series`` (PostgreSQL) or a recursive CTE (SQLite). ``host_hours`` is
written one day per transaction, hour by hour, in the order ingest writes a live database, so
each hour's rows sit together on disk as they would in production (snapshots read one hour at
a time). Then PostgreSQL gets ``VACUUM ANALYZE`` and SQLite a WAL checkpoint, the steady state
of a database that autovacuum (or the last checkpoint) has caught up with.

``metric_bits`` of a generated row is the bitmap of ordinals ``0 … metric_count-1`` (so its
population count *is* ``metric_count``), taken from a small lookup table; the generated tenants
have **no** ``metric_names`` dictionary, so they must never receive real posts (snapshots only
read ``metric_count``). The ingest sample posts to its own tenants (``bench-ingest-<i>``),
which the real ingest path creates, dictionary included.

Safety: bench refuses (exit 2) a database that holds any tenant whose key does not start with
``bench-``, and deletes the previous bench data before generating, so it can be re-run. The
check and the deletion are one transaction that holds the ingest lock; it also refuses, and
deletes nothing, when other data (invoices, say) still refers to the bench tenants.

The package, by concern: :mod:`~jobs.synthetic.bench.tiers` (sizes), :mod:`~.generate` (the fleet,
set-based), :mod:`~.measure` (the timings and their floors), :mod:`~.checks` (correctness) and
:mod:`~.report` (one run end to end). The command line is :mod:`jobs.cli.bench`.
"""
