"""Flat, aligned, joint and auto side by side at the flat method's bytes with k components, on a
collection and on its gauge twin (the same delta W, every adapter's factors re-parameterised
A -> R A, B -> B R^T): what a basis fitted to the factors loses when the adapters' gauges differ,
and what the gauge-invariant methods recover. In memory, one module at a time, with the math
compress runs (pipeline.linalg.budget): joint picks its width c and core rank q for the bytes,
auto takes, per module, the better of flat and joint, as `compress --method auto` does.
"""

from __future__ import annotations

import time

import torch

from pipeline.adapter import Adapter
from pipeline.linalg.budget import fit_flat, fit_within, flat_floats
from pipeline.linalg.gauge import align

METHODS = ("flat", "aligned", "joint", "auto")


def compare(adapters: list[Adapter], k: int) -> dict:
    """Mean relative delta-W error (over adapters, of the mean over modules) and seconds of each
    method; auto's seconds are flat's plus joint's (it fits both)."""
    errors = dict.fromkeys(METHODS, 0.0)
    seconds = dict.fromkeys(METHODS, 0.0)
    chosen = {"flat": 0, "joint": 0}
    joint_shapes = set()
    modules = adapters[0].layer_names
    for module in modules:
        xa = torch.stack([x.lora_a[module].float() for x in adapters]).reshape(len(adapters), -1)
        xb = torch.stack([x.lora_b[module].float() for x in adapters]).reshape(len(adapters), -1)
        shapes = (tuple(adapters[0].lora_a[module].shape), tuple(adapters[0].lora_b[module].shape))
        (r, d_in), (d_out, _) = shapes
        fits = {}
        for method in ("flat", "aligned", "joint"):
            started = time.perf_counter()
            if method == "flat":
                fits[method] = fit_flat(xa, xb, shapes, k)
            elif method == "aligned":
                a, b = align(xa.view(-1, r, d_in), xb.view(-1, d_out, r), k)
                fits[method] = fit_flat(
                    a.to(torch.float32).reshape(len(xa), -1), b.to(torch.float32).reshape(len(xb), -1), shapes, k
                )
            else:
                fits[method] = fit_within(xa, xb, shapes, flat_floats(len(xa), k, r, d_in, d_out), ("joint",))
                joint_shapes.add((fits[method].basis.u.shape[1], fits[method].q))
            seconds[method] += time.perf_counter() - started
            errors[method] += fits[method].error / len(modules)
        best = min(("flat", "joint"), key=lambda m: fits[m].error)
        chosen[best] += 1
        errors["auto"] += fits[best].error / len(modules)
    seconds["auto"] = seconds["flat"] + seconds["joint"]
    return {
        **{m: {"error": errors[m], "seconds": round(seconds[m], 3)} for m in METHODS},
        "joint_width_rank": sorted(joint_shapes),
        "auto_chose": chosen,
    }
