"""Evaluate: will a basis serve future uploads? The collection without a random held-out fraction
is compressed as the store was (its method, k rule or byte budget, quantization; the same Ray
pipeline, into a scratch store), the held-out adapters are projected on the result, and their
delta-W errors are set next to two baselines: the mean adapter alone (the mean factors of the
rest), and each adapter's own best rank-q approximation (its truncated SVD) at the bytes per
adapter the basis spends. Memory is the pipeline's, plus one adapter at a time for the baselines.
"""

from __future__ import annotations

import random
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import Options
from pipeline.errors import PipelineError
from pipeline.flow.scan import read_factors
from pipeline.io.adapters import AdapterRef, discover
from pipeline.io.format import LOADINGS, read_parameters, split_group
from pipeline.io.location import Location, printable
from pipeline.io.store import Store
from pipeline.linalg.budget import joint_floats
from pipeline.linalg.gauge import canonical_factors, pad_rank
from pipeline.linalg.metrics import error_summary, relative_product_error
from pipeline.operations.compress import compress
from pipeline.operations.grow import grow
from pipeline.operations.info import WORST_LISTED, residual_picture, residual_rows
from pipeline.runners import Runner


def evaluate(store: Store, source: Location, runner: Runner, holdout: float = 0.1, seed: int = 0) -> dict:
    manifest = store.manifest()
    refs = discover(source)
    if len(refs) < 3:
        raise PipelineError(f"evaluate needs at least 3 adapters under {source}, found {len(refs)}")
    held = sorted(random.Random(seed).sample(range(len(refs)), max(1, round(holdout * len(refs)))))
    if len(held) >= len(refs) - 1:
        raise PipelineError(f"--holdout {holdout} leaves fewer than 2 adapters to build the basis from")
    train = [r for i, r in enumerate(refs) if i not in set(held)]
    held_refs = [refs[i] for i in held]
    with tempfile.TemporaryDirectory(prefix="lora-subspace-evaluate-") as scratch:
        where = Location(
            scratch, source.endpoint_url
        )  # the listings name the adapters' URIs: read them at their endpoint
        built = Store(where.child("store"))
        compress(_listing(where, "train.parquet", train), built, runner, like(manifest))
        grow(_listing(where, "all.parquet", train + held_refs), built, runner, "project", Options())
        basis_errors = _module_errors(built, [r.task_id for r in held_refs])
        fitted = built.manifest()
        held_out_adapters = _held_out_residuals(built, fitted, basis_errors, [r.task_id for r in held_refs])
    modules = fitted["modules"]
    per_adapter_bytes = _bytes_per_adapter(modules, len(train))
    q = _rank_at_bytes(modules, per_adapter_bytes)
    means = _mean_factors(train, source.endpoint_url)
    names = sorted({split_group(m)[1] for m in modules})  # PEFT names (a grouped store's are per group)
    rows = {"basis": [], "mean_adapter": [], "own_svd": []}
    for ref in held_refs:
        lora_a, lora_b = _factors(ref, source.endpoint_url)
        rows["basis"].append([basis_errors[ref.task_id][m] for m in names])
        mean_errors, own_errors = [], []
        for module in names:
            rank = max(lora_a[module].shape[0], means[module][0].shape[0])
            a, b = (x.float()[None] for x in _padded((lora_a[module], lora_b[module]), rank))
            mean_a, mean_b = (x.float()[None] for x in _padded(means[module], rank))
            mean_errors.append(float(relative_product_error(a, b, mean_a, mean_b)[0]))
            s = canonical_factors(a, b)[2][0]
            own_errors.append(float(s[q:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt().clamp_min(1e-300)))
        rows["mean_adapter"].append(mean_errors)
        rows["own_svd"].append(own_errors)
    summaries = {name: error_summary(np.array(e).mean(axis=1), np.array(e).max(axis=1)) for name, e in rows.items()}
    chosen = sorted({e.get("method", "flat") for e in modules.values()})
    return {
        "store": str(store),
        "source": str(source),
        "methods": chosen,
        "k": _ks(modules),
        "adapters": len(refs),
        "held_out": len(held),
        "seed": seed,
        "own_svd_rank": q,
        "bytes_per_adapter": per_adapter_bytes,
        "held_out_ids": [r.task_id for r in held_refs],
        "error": summaries,
        "worst": _worst(rows, [r.task_id for r in held_refs]),
        "max_error": fitted["parameters"].get("max_error"),
        "held_out_adapters": held_out_adapters,
    }


def like(manifest: dict) -> Options:
    """Compress options that build a store the way the manifest's was built."""
    return read_parameters(manifest["parameters"]).without_idle_adaptive()


def _listing(where: Location, name: str, refs: list[AdapterRef]) -> Location:
    """A Parquet manifest of refs (their URIs and task ids), for compress and project to read."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"uri": [r.location.uri for r in refs], "task_id": [r.task_id for r in refs]}), sink)
    where.write_bytes(sink.getvalue().to_pybytes(), name)
    return where.child(name)


def _module_errors(store: Store, task_ids: list[str]) -> dict[str, dict[str, float]]:
    rows = store.read_table(
        store.current_version(), LOADINGS, task_ids, columns=["task_id", "module", "error"]
    ).to_pylist()
    errors: dict[str, dict[str, float]] = {}
    for row in rows:
        errors.setdefault(row["task_id"], {})[split_group(row["module"])[1]] = row["error"]
    return errors


def _held_out_residuals(
    store: Store, manifest: dict, errors: dict[str, dict[str, float]], task_ids: list[str]
) -> list[dict]:
    """Per held-out adapter, as projected: whether it needed residuals to keep the store's bound
    (its modules with one) and its error (mean over modules) with them and with the shared bases
    alone; the worst without residuals first."""
    rows = residual_rows(store, store.current_version(), manifest, task_ids)
    adapters = []
    for task_id in task_ids:
        picture = residual_picture(errors[task_id], rows.get(task_id, {}), manifest["modules"])
        adapters.append(
            {
                "task_id": task_id,
                "residual_modules": picture["modules"],
                "error": picture["mean"],
                "shared_error": picture["shared_mean"],
            }
        )
    return sorted(adapters, key=lambda a: (-a["shared_error"], a["task_id"]))


def _mean_factors(refs: list[AdapterRef], endpoint_url: str | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each module's mean lora_A and lora_B over refs (zero-padded to the largest rank), read one
    adapter at a time."""
    sums: dict[str, list[torch.Tensor]] = {}
    for ref in refs:
        lora_a, lora_b = _factors(ref, endpoint_url)
        for module in sorted(lora_a):
            a, b = lora_a[module].double(), lora_b[module].double()
            if module in sums:
                rank = max(a.shape[0], sums[module][0].shape[0])
                sums[module] = [x + y for x, y in zip(_padded(sums[module], rank), _padded((a, b), rank))]
            else:
                sums[module] = [a, b]
    return {m: (a / len(refs), b / len(refs)) for m, (a, b) in sums.items()}


def _factors(ref: AdapterRef, endpoint_url: str | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """lora_A and lora_B per module of an adapter, read at the source's endpoint."""
    location = Location(ref.location.uri, endpoint_url)
    return read_factors(AdapterRef(location.root.rsplit("/", 1)[-1], location))


def _padded(factors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = pad_rank(factors[0][None], factors[1][None], rank)
    return a[0], b[0]


def _bytes_per_adapter(modules: dict[str, dict], n: int) -> float:
    """float32 bytes per adapter of the bases and loadings: its share of the bases (and means),
    and its own loadings."""
    floats = 0
    for e in modules.values():
        (r, d_in), (d_out, _) = e["a_shape"], e["b_shape"]
        if e.get("method") == "joint":
            floats += joint_floats(n, e["width"], e["core_rank"], d_in, d_out)
        else:
            floats += (e["k_a"] + 1) * r * d_in + (e["k_b"] + 1) * d_out * r + (e["k_a"] + e["k_b"]) * n
    return 4 * floats / n


def _rank_at_bytes(modules: dict[str, dict], per_adapter_bytes: float) -> int:
    """The largest q whose rank-q factors (q (d_in + d_out) floats per module) fit the bytes per
    adapter (at least 1, at most the collection's rank)."""
    per_rank = 4 * sum(e["a_shape"][1] + e["b_shape"][0] for e in modules.values())
    rank = max(e["a_shape"][0] for e in modules.values())
    return int(min(max(per_adapter_bytes // per_rank, 1), rank))


def _ks(modules: dict[str, dict]) -> list[int]:
    """The flat modules' k, smallest and largest (empty when every module is joint)."""
    ks = sorted({k for e in modules.values() if e.get("method", "flat") != "joint" for k in (e["k_a"], e["k_b"])})
    return [ks[0], ks[-1]] if ks else []


def _worst(rows: dict[str, list[list[float]]], task_ids: list[str]) -> dict[str, dict]:
    """Per approach, the held-out adapter it serves worst: its id and error (mean over modules)."""
    worst = {}
    for name, errors in rows.items():
        means = np.array(errors).mean(axis=1)
        i = int(means.argmax())
        worst[name] = {"task_id": task_ids[i], "error": float(means[i])}
    return worst


def format_evaluation(result: dict) -> str:
    ks = ", k " + "..".join(map(str, sorted(set(result["k"])))) if result["k"] else ""
    lines = [
        f"held out {result['held_out']} of {result['adapters']} adapters (seed {result['seed']}); basis of the rest, "
        f"built as the store's ({', '.join(result['methods'])}{ks})",
        f"delta-W error of the held-out adapters (relative)    {'mean':>7} {'p95':>7} {'max':>7}",
    ]
    names = {
        "basis": "the basis",
        "mean_adapter": "the mean adapter alone",
        "own_svd": f"each adapter's own rank-{result['own_svd_rank']} SVD, same bytes",
    }
    for key, name in names.items():
        e = result["error"][key]
        lines.append(f"  {name:50} {e['mean']:7.4f} {e['p95']:7.4f} {e['max']:7.4f}")
    worst = result["worst"]["basis"]
    lines.append(
        f"worst held-out adapter under the basis: {printable(worst['task_id'])}, error {worst['error']:.4f} "
        f"(mean {result['error']['basis']['mean']:.4f})"
    )
    return "\n".join(lines + _residual_lines(result))


def _residual_lines(result: dict) -> list[str]:
    """Under an error bound: how many held-out adapters needed residuals, then each held-out
    adapter (the WORST_LISTED worst without residuals) with its error with and without them."""
    if result.get("max_error") is None:
        return []
    adapters = result["held_out_adapters"]
    needing = sum(a["residual_modules"] > 0 for a in adapters)
    lines = [
        f"bound {result['max_error']:g}: {needing} of {len(adapters)} held-out adapters need residuals; "
        "per adapter, error with residuals / with the shared bases alone (mean over modules):"
    ]
    for a in adapters[:WORST_LISTED]:
        has = f"residuals in {a['residual_modules']} module(s)" if a["residual_modules"] else "no residuals"
        lines.append(f"  {printable(a['task_id'])}: {a['error']:.4f} / {a['shared_error']:.4f}, {has}")
    if len(adapters) > WORST_LISTED:
        lines.append(f"  and {len(adapters) - WORST_LISTED} more (--json lists every one)")
    return lines
