"""The main job on embedded defaults: a synthetic collection of bf16 adapters, compressed on an
embedded local Ray into a local folder store; then a day's uploads arrive and are projected and
absorbed by an incremental re-base; versions listed, the store described, one adapter exported.

    python -m jobs.demo [--adapters 64] [--uploads 16] [--dir demo-data]

Starts from scratch: --dir is emptied first.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from pipeline.cli import main as cli
from pipeline.io.location import Location
from pipeline.synthetic import generate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=64, help="adapters compressed on day one")
    parser.add_argument("--uploads", type=int, default=16, help="adapters uploaded on day two")
    parser.add_argument("--dir", type=Path, default=Path("demo-data"))
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    source, incoming, store, export = (args.dir / name for name in ("adapters", "incoming", "store", "export"))
    ids = generate(Location(str(incoming)), args.adapters + args.uploads, preset="tiny", dtype=torch.bfloat16, seed=0)
    source.mkdir(parents=True)

    def upload(names):
        for name in names:
            shutil.move(incoming / name, source / name)
        print(f"\n# {len(names)} adapters uploaded to {source}")

    started = time.perf_counter()
    upload(ids[: args.adapters])
    if not run(["compress", source, "--out", store, "--components", "8"]):
        return 1
    upload(ids[args.adapters :])
    for step in (
        ["project", store, source],
        ["rebase", store, source],
        ["versions", store],
        ["info", store],
        ["export", store, ids[-1], "--out", export / ids[-1]],
    ):
        if not run(step):
            return 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s; driver peak RSS {peak:.0f} MiB")
    return 0


def run(step: list) -> bool:
    print(f"\n$ lora-subspace {' '.join(map(str, step))}")
    return cli([str(s) for s in step]) == 0


if __name__ == "__main__":
    sys.exit(main())
