"""The floors a compress run is measured against, both without Ray: reading every weights file
once with safetensors, and the bare math (the SVD by the cheapest exact route for each module
side, on stacks prepared beforehand, untimed)."""

from __future__ import annotations

import time
from collections import Counter

import torch
from safetensors.torch import load, load_file

from pipeline import peft_format
from pipeline.io.adapters import read_ranges, read_tensor_table
from pipeline.io.safetensors_ranges import decode
from pipeline.linalg.decompose import centred_svd


def read_floor(fs, paths: list[str], local: bool) -> dict:
    """Seconds and bytes to load every file whole with safetensors (local files by path, as
    safetensors reads them best; remote ones fetched whole, then parsed)."""
    started, size = time.perf_counter(), 0
    for path in paths:
        tensors = load_file(path) if local else load(fs.cat_file(path))
        size += sum(t.numel() * t.element_size() for t in tensors.values())
    return {"seconds": time.perf_counter() - started, "bytes": size}


def math_floor(fs, paths: list[str], components: int, route: str = "auto") -> dict:
    """Seconds of centred_svd over every module side by `route`, one module's stacks in memory at a time."""
    layout = {path: read_tensor_table(path, fs.size(path), fs) for path in paths}
    modules = sorted({parsed[0] for parsed in map(peft_format.parse_key, layout[paths[0]]) if parsed})
    seconds, routes = 0.0, Counter()
    for module in modules:
        keys = [peft_format.weight_key(module, side) for side in "AB"]
        blobs, _ = read_ranges(fs, [(path, [layout[path][k] for k in keys]) for path in paths])
        for side, key in enumerate(keys):
            x = torch.stack([decode(b[side], layout[p][key]).reshape(-1).float() for p, b in zip(paths, blobs)])
            started = time.perf_counter()
            routes[centred_svd(x, components, route=route).route] += 1
            seconds += time.perf_counter() - started
    return {"seconds": seconds, "routes": dict(routes)}
