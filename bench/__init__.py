"""Benchmarks of levers' workers: per-job overhead, lever efficiency and worker memory.

Run them with ``bin/bench`` (``bin/bench --quick`` for a short version); see bench/README.md.
Benchmarks are not tests: they measure, print and write bench/RESULTS.md, and never fail on a target.
"""
