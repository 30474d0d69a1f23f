"""Synthetic fleets, the demo and the benchmark. Used by :mod:`jobs.cli`; never imports it."""
