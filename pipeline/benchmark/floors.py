"""The floors a compress run is measured against, both without Ray: reading every weights file
once with safetensors, and the bare math (the SVD by the cheapest exact route for each module
side, on stacks prepared beforehand, untimed), on the CPU or a CUDA device."""

from __future__ import annotations

import time
from collections import Counter

import torch
from safetensors.torch import load, load_file
from torch.utils.flop_counter import FlopCounterMode

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


def math_floor(
    fs, paths: list[str], components: int, route: str = "auto", device: str = "cpu", flops: bool = False
) -> dict:
    """Seconds of centred_svd over every module side by `route` on `device`, one module's stacks
    in memory at a time. `flops`: also count the matrix products' floating-point operations, in a
    second, untimed pass (torch's FlopCounterMode; the small eigen and QR steps are not counted)."""
    layout = {path: read_tensor_table(path, fs.size(path), fs) for path in paths}
    modules = sorted({parsed[0] for parsed in map(peft_format.parse_key, layout[paths[0]]) if parsed})
    seconds, routes, counted = 0.0, Counter(), 0
    _warm_up(device)
    for module in modules:
        keys = [peft_format.weight_key(module, side) for side in "AB"]
        blobs, _ = read_ranges(fs, [(path, [layout[path][k] for k in keys]) for path in paths])
        for side, key in enumerate(keys):
            x = torch.stack([decode(b[side], layout[p][key]).reshape(-1).float() for p, b in zip(paths, blobs)])
            x = x.to(device)
            _synchronize(device)
            started = time.perf_counter()
            routes[centred_svd(x, components, route=route).route] += 1
            _synchronize(device)
            seconds += time.perf_counter() - started
            if flops:
                with FlopCounterMode(display=False) as counter:
                    centred_svd(x, components, route=route)
                counted += counter.get_total_flops()
    return {"seconds": seconds, "routes": dict(routes), **({"flops": counted} if flops else {})}


def _warm_up(device: str) -> None:
    """One small decomposition first, so a CUDA context and its solver handles are not timed."""
    if device != "cpu":
        centred_svd(torch.randn(64, 256, device=device), 8)
        _synchronize(device)


def _synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize(device)
