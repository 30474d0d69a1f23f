"""hostmeter metering: recording usage (ingest) and hourly usage snapshots."""
