"""Benchmarks behind ``surgeon-bench``."""
