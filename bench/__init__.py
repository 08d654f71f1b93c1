"""Benchmarks (``python -m bench.run``; results in bench/results/)."""
