"""Benchmarks that print and save numbers: latency of real skipping, accuracy-MACs trade-offs."""
