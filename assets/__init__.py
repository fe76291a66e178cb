"""Dagster software-defined assets, one module per stage: ingest, extract, curate, train, evaluate."""
