"""Data-quality suites, scoring and profiling."""
