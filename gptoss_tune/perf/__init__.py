"""Benchmark harness at the real gpt-oss dimensions with random weights (driven by scripts/bench_*.py)."""
