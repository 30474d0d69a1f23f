"""The ``hostmeter`` command line (click): the top layer, which nothing else imports.

:mod:`~jobs.cli.root` is the group and the console script's :func:`main`; each other module
holds the commands of one concern. ``python -m jobs.cli`` runs it too.
"""

from __future__ import annotations

from jobs.cli.root import cli, main

__all__ = ["cli", "main"]
