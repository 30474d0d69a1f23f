"""hostmeter jobs: the CLI, job runner, schedules, logging, demo and benchmarks."""
