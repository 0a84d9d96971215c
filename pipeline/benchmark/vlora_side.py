"""vlora-dev's SharedSubspace on the same adapters, in a process of its own so its time and
memory are its own: `python -m pipeline.benchmark.vlora_side LISTING COMPONENTS OUT_JSON`.

LISTING holds one adapter folder per line. Timed: load_adapter of every folder (cast to float32:
vlora's SVD refuses bfloat16) and from_adapters. Not timed: the delta-W error of every adapter's
reconstruction, measured as the pipeline measures it (relative, per module, mean over modules).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from vlora.io import load_adapter
from vlora.subspace import SharedSubspace

from pipeline.linalg.metrics import error_summary, relative_product_error


def main(argv: list[str]) -> None:
    listing, components, out = argv
    folders = [Path(line) for line in Path(listing).read_text().split()]
    started = time.perf_counter()
    adapters = []
    for folder in folders:
        adapter = load_adapter(folder)
        adapter.lora_a = {k: v.float() for k, v in adapter.lora_a.items()}
        adapter.lora_b = {k: v.float() for k, v in adapter.lora_b.items()}
        adapters.append(adapter)
    loaded = time.perf_counter()
    ids = [f.name for f in folders]
    subspace = SharedSubspace.from_adapters(adapters, task_ids=ids, num_components=int(components))
    fitted = time.perf_counter()
    means, maxes = [], []
    for task_id, adapter in zip(ids, adapters):
        rebuilt = subspace.reconstruct(task_id)
        errors = torch.stack(
            [
                relative_product_error(
                    adapter.lora_a[m][None], adapter.lora_b[m][None], rebuilt.lora_a[m][None], rebuilt.lora_b[m][None]
                )[0]
                for m in subspace.layer_names
            ]
        )
        means.append(float(errors.mean()))
        maxes.append(float(errors.max()))
    Path(out).write_text(
        json.dumps(
            {
                "seconds": fitted - started,
                "load_seconds": loaded - started,
                "fit_seconds": fitted - loaded,
                "error": error_summary(np.array(means), np.array(maxes)),
                "cast": "float32",
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
