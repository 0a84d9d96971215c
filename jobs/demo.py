"""The main job on embedded defaults: a synthetic collection of 64 bf16 adapters, compressed on an
embedded local Ray into a local folder store, described, and one adapter exported.

    python -m jobs.demo [--adapters 64] [--dir demo-data]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from pipeline.cli import main as cli
from pipeline.io.location import Location
from pipeline.synthetic import generate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=Path("demo-data"))
    args = parser.parse_args()
    source, store, export = args.dir / "adapters", args.dir / "store", args.dir / "export"
    if not source.exists():
        generate(Location(str(source)), args.adapters, preset="tiny", dtype=torch.bfloat16, seed=0)
        print(f"generated {args.adapters} synthetic adapters in {source}")
    started = time.perf_counter()
    steps = [
        ["compress", source, "--out", store, "--components", "8"],
        ["info", store],
        ["export", store, "adapter-00042", "--out", export / "adapter-00042"],
    ]
    for step in steps:
        print(f"\n$ lora-subspace {' '.join(map(str, step))}")
        if cli([str(s) for s in step]) != 0:
            return 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s; driver peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
