"""Benchmark plumbing and tools that measure nothing themselves: result rows and environment
(common.py), GPU clock and power sampling (power.py), plots and tables from result rows (plot.py),
per-class profile sums (profile_classes.py)."""
