"""Benchmarks: each prints the baseline, our figure, the ratio and the machine. Run as modules,
e.g. `.venv/bin/python -m benchmarks.quantize_throughput`."""
