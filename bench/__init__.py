"""Benchmark scripts (docs/BENCHMARKS.md); a package so they can share helpers."""
