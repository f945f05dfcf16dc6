"""Benchmarks that measure the O(n) claims: ratios within one run, beside the machine's peak."""
