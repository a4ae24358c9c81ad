"""Benchmarks of the poller: ``python -m benchmarks.run`` (see README.md in this directory)."""
