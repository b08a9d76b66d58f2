"""Data and model preparation, demo, benchmarks and audits: run from the repository root as
`python -m scripts.NAME`."""
