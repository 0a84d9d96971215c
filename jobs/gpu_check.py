"""GPU check: `python -m jobs.gpu_check [--config jobs/configs/gpu-check.yaml] [--set key=value]`.
What it runs is pipeline.benchmark.gpu's; see the README's paragraph on it."""

import sys

from pipeline.benchmark.gpu import main

if __name__ == "__main__":
    sys.exit(main())
