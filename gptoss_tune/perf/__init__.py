"""Benchmark harness at the real gpt-oss dimensions (driven by scripts/bench_train.py).

models.py builds ours and the baseline with the same random weights, flops.py counts FLOPs and the
device's peak, bench.py times training steps from a `BenchConfig`, report.py reads the result (goals,
table, JSON). It sits on top, beside cli/: it may import model/, data/ and train/; nothing imports it.
"""
