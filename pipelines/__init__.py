"""Orchestration glue: Dagster Definitions, resources, sensors, jobs, the CLI and dataset sources."""
