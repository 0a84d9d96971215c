"""Flat, aligned and joint bases side by side at equal bytes, on a collection and on its gauge
twin (the same delta W, every adapter's factors re-parameterised A -> R A, B -> B R^T): what a
basis fitted to the factors loses when the adapters' gauges differ, and what the gauge-invariant
methods of pipeline.linalg.gauge recover. In memory, one module at a time; the pipeline's compress
is the flat method.
"""

from __future__ import annotations

import time

import torch

from pipeline.adapter import Adapter
from pipeline.linalg.decompose import centred_svd
from pipeline.linalg.gauge import align, fit_joint, joint_cores
from pipeline.linalg.loadings import project_factors

METHODS = ("flat", "aligned", "joint")


def flat_floats(n: int, k: int, r: int, d_in: int, d_out: int) -> int:
    """Floats one module takes with the flat method: components, means, loadings."""
    return (k + 1) * r * (d_in + d_out) + 2 * k * n


def joint_width(budget: int, n: int, q: int, d_in: int, d_out: int) -> int:
    """The widest c whose U, V and rank-q factored cores fit `budget` floats."""
    return max(1, min(d_in, d_out, budget // (d_in + d_out + 2 * n * q)))


def compare(adapters: list[Adapter], k: int) -> dict:
    """Mean relative delta-W error (over adapters, of the mean over modules) and seconds of each
    method, the joint one at the flat method's bytes with q = r."""
    n = len(adapters)
    errors = {m: torch.zeros(n, dtype=torch.float64) for m in METHODS}
    seconds = dict.fromkeys(METHODS, 0.0)
    widths = {}
    modules = adapters[0].layer_names
    for module in modules:
        a = torch.stack([x.lora_a[module].float() for x in adapters])
        b = torch.stack([x.lora_b[module].float() for x in adapters])
        r, d_in, d_out = a.shape[1], a.shape[2], b.shape[1]
        for method in METHODS:
            started = time.perf_counter()
            if method == "joint":
                c = widths[module] = joint_width(flat_floats(n, k, r, d_in, d_out), n, r, d_in, d_out)
                error = joint_cores(fit_joint(a, b, c), a, b, r)[2]
            else:
                fa, fb = (a, b) if method == "flat" else (x.to(torch.float32) for x in align(a, b, k))
                xa, xb = fa.reshape(n, -1), fb.reshape(n, -1)
                error = project_factors(xa, xb, centred_svd(xa, k), centred_svd(xb, k), ((r, d_in), (d_out, r)))[2]
            seconds[method] += time.perf_counter() - started
            errors[method] += error.to(torch.float64) / len(modules)
    return {
        **{m: {"error": float(errors[m].mean()), "seconds": round(seconds[m], 3)} for m in METHODS},
        "joint_width": sorted(set(widths.values())),
    }
