"""Benchmarks behind ``fleetlm bench``: each compares against its baselines in one run,
prints a table and writes JSON. Timing lives here, never in unit tests."""
