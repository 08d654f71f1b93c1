"""The scale harness (issue 51): the stores of a facility's year, filled and measured; see bench/bench_scale.py."""
