"""vlora's on-disk layout (SharedSubspace.save of vlora-dev 0.2), read into a Subspace and written
from one, so vlora users move their subspaces into a store and back.

    DIR/subspace_meta.json        {"layer_names", "task_ids", "rank", "num_components"}
    DIR/subspace.safetensors      <layer>.components_a / _b (k, D), .sv_a / _b (k,), .mean_a / _b (D,)
    DIR/task_<task_id>.safetensors <layer>.loadings_a / _b (k,)

vlora keeps neither the total variance nor the original adapters. An imported basis therefore
counts its kept variance as the total (explained variance 1), and each task's error is relative
to what vlora stored (0: the import is lossless); `rebase --full --from-source` against the
original adapters measures the real errors.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.config import ComponentRule
from pipeline.errors import AdapterError, PipelineError
from pipeline.flow.scan import check_task_id
from pipeline.io.format import is_safe_task_id
from pipeline.io.location import Location
from pipeline.io.targets import holding_files
from pipeline.linalg.decompose import Decomposition
from pipeline.subspace import ModuleBasis, Projection, Subspace

META = "subspace_meta.json"
BASIS = "subspace.safetensors"


def task_file(task_id: str) -> str:
    return f"task_{task_id}.safetensors"


def read_vlora(uri: str, endpoint_url: str | None = None) -> Subspace:
    where = Location(uri, endpoint_url)
    try:
        meta = json.loads(where.read_bytes(META))
        layers, task_ids, rank = list(meta["layer_names"]), list(meta["task_ids"]), int(meta["rank"])
        tensors = load_safetensors(where.read_bytes(BASIS))
    except FileNotFoundError as exc:
        raise PipelineError(f"{where} is not a vlora subspace folder: {exc.filename or exc} is missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{where}/{META} is not a vlora subspace description: {exc!r}") from None
    if not layers or rank <= 0:
        raise PipelineError(f"{where}/{META}: no layers, or rank {rank}")
    for task_id in task_ids:
        try:
            check_task_id(task_id)
        except AdapterError as exc:
            raise PipelineError(f"{where}: {exc}") from None
    modules, to_orthonormal = {}, {}
    for layer in layers:
        try:
            sides = [
                (tensors[f"{layer}.components_{s}"], tensors[f"{layer}.sv_{s}"], tensors[f"{layer}.mean_{s}"])
                for s in "ab"
            ]
        except KeyError as exc:
            raise PipelineError(f"{where}/{BASIS} has no {exc.args[0]}") from None
        decs = []
        for side, (components, sv, mean) in zip("AB", sides):
            width = mean.numel()
            if (
                components.dim() != 2
                or components.shape[1] != width
                or sv.shape != (components.shape[0],)
                or width % rank
            ):
                raise PipelineError(
                    f"{where}/{BASIS}: {layer} lora_{side} has components {list(components.shape)}, "
                    f"singular values {list(sv.shape)}, mean {list(mean.shape)} for rank {rank}"
                )
            if not all(torch.isfinite(t).all() for t in (components, sv, mean)):
                raise PipelineError(f"{where}/{BASIS}: NaN or Inf in {layer} lora_{side}")
            sv = sv.to(torch.float32)
            components, to_orthonormal[layer, side] = _orthonormal(components)
            decs.append(
                Decomposition(
                    components,
                    sv,
                    mean.to(torch.float32).reshape(-1),
                    float((sv.double() ** 2).sum()),
                    "vlora",
                    len(task_ids),
                )
            )
        a_width, b_width = decs[0].mean.numel(), decs[1].mean.numel()
        modules[layer] = ModuleBasis(decs[0], decs[1], ((rank, a_width // rank), (b_width // rank, rank)))
    sub = Subspace(modules, ComponentRule(int(meta.get("num_components") or 0) or None))
    for task_id in task_ids:
        try:
            loadings = load_safetensors(where.read_bytes(task_file(task_id)))
            projection = Projection(
                task_id,
                *(
                    {m: _moved(loadings[f"{m}.loadings_{s.lower()}"], to_orthonormal[m, s]) for m in layers}
                    for s in "AB"
                ),
            )
        except FileNotFoundError:
            raise PipelineError(f"{where}: task {task_id!r} has no {task_file(task_id)}") from None
        except KeyError as exc:
            raise PipelineError(f"{where}/{task_file(task_id)} has no {exc.args[0]}") from None
        projection.catalog = _catalog_row(task_id, modules)
        try:
            sub.add_task(projection)
        except ValueError as exc:
            raise PipelineError(f"{where}: {exc}") from None
    return sub


def check_folder(uri: str, endpoint_url: str | None = None, overwrite: bool = False) -> None:
    """The vlora layout is written into a new or empty folder; into one holding files only with
    `overwrite` (the files of the layout are replaced, others left)."""
    where = Location(uri, endpoint_url)
    if not overwrite and holding_files(where, [""]):
        raise PipelineError(
            f"{where} already holds files; vlora-export writes only into a new or empty folder "
            "(--overwrite writes over them)"
        )


def write_vlora(sub: Subspace, uri: str, endpoint_url: str | None = None, overwrite: bool = False) -> int:
    """Write the vlora layout (task files, the basis, the metadata last); returns the task count.
    Every check comes first: a refused write leaves the folder as it was."""
    ranks = {mb.shapes[0][0] for mb in sub.modules.values()}
    if len(ranks) != 1:
        raise PipelineError(f"vlora holds one rank for every layer; this subspace has ranks {sorted(ranks)}")
    where = Location(uri, endpoint_url)
    tasks = sub.tasks
    # A task id names a file (task_<id>.safetensors): one read from a store that is not a safe
    # relative path would be written outside the folder.
    unsafe = [t for t in tasks if not is_safe_task_id(t)]
    if unsafe:
        shown = ", ".join(repr(t) for t in unsafe[:10]) + (f" and {len(unsafe) - 10} more" if len(unsafe) > 10 else "")
        holder = f"{sub.origin[0]} {sub.origin[1]}" if sub.origin else "the subspace"
        raise PipelineError(
            f"{holder} holds task id(s) that are not safe relative paths, so not "
            f"file names under {where}: {shown}; nothing was written"
        )
    check_folder(uri, endpoint_url, overwrite)
    for task_id in tasks:
        t = tasks[task_id]
        data = {}
        for layer in sub.layer_names:
            data[f"{layer}.loadings_a"] = t.loadings_a[layer].to("cpu", torch.float32).contiguous()
            data[f"{layer}.loadings_b"] = t.loadings_b[layer].to("cpu", torch.float32).contiguous()
        where.write_bytes(save_safetensors(data), task_file(task_id))
    basis = {}
    for layer, mb in sub.modules.items():
        for s, dec in (("a", mb.a), ("b", mb.b)):
            basis[f"{layer}.components_{s}"] = dec.components.to("cpu", torch.float32).contiguous()
            basis[f"{layer}.sv_{s}"] = dec.singular_values.to("cpu", torch.float32).contiguous()
            basis[f"{layer}.mean_{s}"] = dec.mean.to("cpu", torch.float32).contiguous()
    where.write_bytes(save_safetensors(basis), BASIS)
    meta = {
        "layer_names": sub.layer_names,
        "task_ids": list(tasks),
        "rank": ranks.pop(),
        "num_components": sub.num_components,
    }
    where.write_bytes(json.dumps(meta, indent=2).encode(), META)
    return len(tasks)


def _orthonormal(components: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Components with orthonormal rows spanning the same space, and R with l V = (l R) Q, or
    None when they already are orthonormal. vlora's incremental updates and in-memory rounding
    (quantize) leave bases that are not, which the store's readers assume."""
    v = components.to(torch.float64)
    if not len(v) or float((v @ v.T - torch.eye(len(v), dtype=torch.float64)).abs().max()) <= 1e-5:
        return components.to(torch.float32), None
    q, r = torch.linalg.qr(v.T)  # V^T = Q R, so V = R^T Q^T
    return q.T.to(torch.float32).contiguous(), r.T


def _moved(loadings: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
    return loadings.to(torch.float32) if r is None else (loadings.to(torch.float64) @ r).to(torch.float32)


def _catalog_row(task_id: str, modules: dict[str, ModuleBasis]) -> dict:
    weights = sum(4 * (mb.a.mean.numel() + mb.b.mean.numel()) for mb in modules.values())
    return {
        "task_id": task_id,
        "uri": "",
        "status": "ok",
        "reason": "",
        "warnings": ["imported from vlora: the original adapter is not available; size is its float32 factors' bytes"],
        "weights_bytes": weights,
        "weights_tag": "",
        "rank": max(mb.shapes[0][0] for mb in modules.values()),
        "lora_alpha": None,
        "use_rslora": False,
        "base_model": None,
        "dtype": "F32",
        "config_json": "",
        "in_basis": True,
    }
