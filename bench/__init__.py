"""Benchmarks: run from the repository root, e.g. `python -m bench.engine` (see bench/README.md)."""
