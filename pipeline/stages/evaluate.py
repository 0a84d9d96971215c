"""Evaluate: will a basis serve future uploads? A basis is built from the collection without a
random held-out fraction (as the store was built: its k), the held-out adapters are projected on
it, and their delta-W errors are set next to two baselines: the mean adapter alone (k = 0), and
each adapter's own best rank-q approximation (its truncated SVD) at the bytes per adapter the
store spends. Built with the Python API's streaming build, so memory holds one batch of adapters.
"""

from __future__ import annotations

import random

import numpy as np

from pipeline.adapter import Adapter
from pipeline.errors import PipelineError
from pipeline.io.adapters import discover
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.linalg.gauge import canonical_factors
from pipeline.linalg.metrics import relative_product_error
from pipeline.stages.version import error_summary
from pipeline.subspace import Subspace

BATCH = 32


def evaluate(store: Store, source: Location, holdout: float = 0.1, seed: int = 0) -> dict:
    manifest = store.manifest()
    modules = manifest["modules"]
    if any(e.get("method") == "joint" for e in modules.values()):
        raise PipelineError(f"{store} has joint modules: evaluate builds flat bases (as the Python API does) and cannot mirror them yet")
    k = max(max(e["k_a"], e["k_b"]) for e in modules.values())
    refs = discover(source)
    if len(refs) < 3:
        raise PipelineError(f"evaluate needs at least 3 adapters under {source}, found {len(refs)}")
    held = sorted(random.Random(seed).sample(range(len(refs)), max(1, round(holdout * len(refs)))))
    if len(held) >= len(refs) - 1:
        raise PipelineError(f"--holdout {holdout} leaves fewer than 2 adapters to build the basis from")
    train = [r for i, r in enumerate(refs) if i not in set(held)]
    sub = Subspace.from_adapters_streaming([r.location.uri for r in train], [r.task_id for r in train], k, BATCH, source.endpoint_url)
    q = _rank_at_bytes(sub, len(train), k)
    rows = {"basis": [], "mean_adapter": [], "own_svd": []}
    for i in held:
        adapter = Adapter.load(refs[i].location.uri, source.endpoint_url)
        projection = sub.project(adapter, refs[i].task_id)
        rows["basis"].append(list(projection.error.values()))
        mean_errors, own_errors = [], []
        for module, mb in sub.modules.items():
            a, b = adapter.lora_a[module].float()[None], adapter.lora_b[module].float()[None]
            mean_a, mean_b = mb.a.mean.reshape(mb.shapes[0])[None], mb.b.mean.reshape(mb.shapes[1])[None]
            mean_errors.append(float(relative_product_error(a, b, mean_a, mean_b)[0]))
            s = canonical_factors(a, b)[2][0]
            own_errors.append(float(s[q:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt().clamp_min(1e-300)))
        rows["mean_adapter"].append(mean_errors)
        rows["own_svd"].append(own_errors)
    summaries = {}
    for name, errors in rows.items():
        errors = np.array(errors)
        summaries[name] = error_summary(errors.mean(axis=1), errors.max(axis=1))
    return {
        "store": str(store), "source": str(source), "k": k, "adapters": len(refs), "held_out": len(held), "seed": seed,
        "own_svd_rank": q, "bytes_per_adapter": _bytes_per_adapter(sub, len(train), k),
        "held_out_ids": [refs[i].task_id for i in held], "error": summaries,
    }


def _bytes_per_adapter(sub: Subspace, n: int, k: int) -> float:
    """float32 bytes per adapter of a flat store of n adapters: its share of the bases and means,
    and its loadings."""
    floats = sum((k + 1) * (mb.a.mean.numel() + mb.b.mean.numel()) + 2 * k * n for mb in sub.modules.values())
    return 4 * floats / n


def _rank_at_bytes(sub: Subspace, n: int, k: int) -> int:
    """The largest q whose rank-q factors (q (d_in + d_out) floats per module) fit the store's bytes
    per adapter (at least 1, at most the adapter's rank)."""
    per_rank = 4 * sum(mb.shapes[0][1] + mb.shapes[1][0] for mb in sub.modules.values())
    return int(min(max(_bytes_per_adapter(sub, n, k) // per_rank, 1), sub.rank))


def format_evaluation(result: dict) -> str:
    lines = [
        f"held out {result['held_out']} of {result['adapters']} adapters (seed {result['seed']}); basis of the rest, k = {result['k']}",
        f"delta-W error of the held-out adapters (relative)    {'mean':>7} {'p95':>7} {'max':>7}",
    ]
    names = {"basis": "the basis", "mean_adapter": "the mean adapter alone",
             "own_svd": f"each adapter's own rank-{result['own_svd_rank']} SVD, same bytes"}
    for key, name in names.items():
        e = result["error"][key]
        lines.append(f"  {name:50} {e['mean']:7.4f} {e['p95']:7.4f} {e['max']:7.4f}")
    return "\n".join(lines)
