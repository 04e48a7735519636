"""Reproducible measurements: each module offers ``BENCH_CLI = {name: (add_arguments, run_cli)}``."""
