"""Benchmark harness at the real gpt-oss dimensions (driven by scripts/bench_*.py)."""
