"""Benchmark job: `python -m jobs.benchmark [--config jobs/configs/benchmark.yaml] [--set key=value]`.
What it runs is pipeline.benchmark.run's; see docs/benchmarks.md."""

import sys

from pipeline.benchmark.run import main

if __name__ == "__main__":
    sys.exit(main())
