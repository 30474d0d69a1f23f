"""The job-metrics pipeline: job logs (files, CloudWatch Logs) → the job-metrics store →
exporters (Mackerel, Prometheus) and the dashboard. httpx and prometheus-client are imported
only where they are used."""
