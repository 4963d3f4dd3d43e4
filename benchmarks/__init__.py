"""Benchmark suites for ringattn (not part of the installed package): ``python -m benchmarks --help``."""
