"""Benchmarks for headserve: one run measures the server against its own baselines, side by side.

`python -m bench [--quick] [--out FILE]` writes JSON and a markdown table; see `bench.run`.
"""
