"""Benchmarks that run the worker's own cache code; see each module's docstring."""
