"""The in-process API on the same adapters, in a process of its own so its time and memory are
its own: `python -m pipeline.benchmark.library_side LISTING COMPONENTS MODE OUT_JSON [ENDPOINT]`.

LISTING holds one adapter folder (path or URI) per line. MODE `streaming`:
Subspace.from_adapters_streaming (32 adapters in memory at a time, every adapter read twice);
`in-memory`: Subspace.from_adapters on all of them. Timed: the build, reading included. The
error summary is the one every task carries (measured when projected).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pipeline.subspace import Subspace

STREAM_BATCH = 32


def main(argv: list[str]) -> None:
    listing, components, mode, out, *endpoint = argv
    paths = Path(listing).read_text().split()
    ids = [p.rstrip("/").rsplit("/", 1)[-1] for p in paths]
    endpoint_url = endpoint[0] if endpoint else None
    started = time.perf_counter()
    if mode == "streaming":
        sub = Subspace.from_adapters_streaming(paths, ids, int(components), STREAM_BATCH, endpoint_url)
    else:
        from pipeline.adapter import Adapter

        sub = Subspace.from_adapters(
            [Adapter.load(p, endpoint_url) for p in paths], ids, num_components=int(components)
        )
    seconds = time.perf_counter() - started
    Path(out).write_text(json.dumps({"seconds": seconds, "adapters": len(sub.tasks), "error": sub.error_summary()}))


if __name__ == "__main__":
    main(sys.argv[1:])
