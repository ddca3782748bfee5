"""Benchmarks (`qtool bench ...`)."""
