"""``python -m jobs.cli``: the ``hostmeter`` command line."""

from jobs.cli.root import main

main()
