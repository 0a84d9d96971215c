"""vlora's folder layout (pipeline.io.vlora) into a store version and back, so vlora users move
their subspaces into a store and out again.

vlora-import publishes through the flow like compress: one task per group of layers reads that
group's bases and every task's loadings of it by byte ranges (pipeline.flow.vlora_import).
vlora-export writes the per-task files in batches of tasks, each task reading only its batch's
rows of the loadings table, then streams the basis file one basis object at a time, and the
description last.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial

import pyarrow.compute as pc
from safetensors.torch import save as save_safetensors

from pipeline.config import ComponentRule, Options
from pipeline.errors import IntegrityError, PipelineError
from pipeline.flow.change import Change
from pipeline.flow.publish import write_version
from pipeline.flow.vlora_import import compute_imported, scan_tasks
from pipeline.io.format import LOADINGS, is_safe_task_id, loadings_matrix, read_decomposition
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.io.targets import holding_files
from pipeline.io.vlora import BASIS, META, Layout, read_layout, task_file, write_streamed
from pipeline.operations.compress import check_out
from pipeline.operations.export import refuse_groups, refuse_residuals, select
from pipeline.operations.quantize import refuse_joint, version_size
from pipeline.runners import Runner, for_work

_DEFAULT_OPTIONS = Options()
SHOWN_IDS = 10  # ids named in one error line


def import_vlora(
    folder: Location, store: Store, runner: Runner, replace: bool = False, options: Options = _DEFAULT_OPTIONS
) -> dict:
    """Publish a vlora folder as the store's next version: {"version", "tasks", "modules"}. A store
    that has versions takes it only with `replace` (earlier versions stay, for rollback)."""
    check_out(store, "vlora-import", "STORE ")
    _refuse_versions(store, replace)
    layout = read_layout(folder)
    basis_bytes = sum(info.end - info.start for fields in layout.basis.values() for info in fields.values())
    runner = for_work(runner, len(layout.task_ids), basis_bytes)  # and each task's small file
    found = scan_tasks(layout, runner)
    if not found:
        raise PipelineError(f"nothing to publish to {store}: the subspace holds no adapters")
    options = Options(ComponentRule(layout.num_components), options.task_memory, route="auto", method="flat")
    with store.lock("vlora-import") as lock:
        parent = _refuse_versions(store, replace)
        change = Change("vlora-import", "import", [], parent, catalog=[catalog_row(t, layout) for t in found])
        compute = partial(compute_imported, layout, found)
        summary = write_version(change, None, store, runner, options, lock, compute=compute)
    return {"version": summary.version, "tasks": len(found), "modules": len(layout.layers)}


def _refuse_versions(store: Store, replace: bool) -> str | None:
    current = store.current_version()
    if current is not None and not replace:
        raise PipelineError(
            f"store {store} already has versions (current {current}): add --replace to publish the "
            "imported subspace as its next version (earlier versions stay, for rollback)"
        )
    return current


def catalog_row(task_id: str, layout: Layout) -> dict:
    weights = sum(4 * layout.width(layer, side) for layer in layout.layers for side in "ab")
    return {
        "task_id": task_id,
        "uri": "",
        "status": "ok",
        "reason": "",
        "warnings": ["imported from vlora: the original adapter is not available; size is its float32 factors' bytes"],
        "weights_bytes": weights,
        "weights_tag": "",
        "rank": layout.rank,
        "lora_alpha": None,
        "use_rslora": False,
        "base_model": None,
        "dtype": "F32",
        "config_json": "",
        "in_basis": True,
    }


# -- export ------------------------------------------------------------------------------------


@dataclass
class TaskFiles:
    """A batch of tasks whose vlora task files one task writes."""

    store: Location
    version: str
    folder: Location
    k: dict[str, tuple[int, int]]  # layer -> (k_a, k_b), layers sorted
    task_ids: list[str]  # sorted


def check_folder(where: Location, overwrite: bool = False) -> None:
    """The vlora layout is written into a new or empty folder; into one holding files only with
    `overwrite` (the files of the layout are replaced, others left)."""
    if not overwrite and holding_files(where, [""]):
        raise PipelineError(
            f"{where} already holds files; vlora-export writes only into a new or empty folder "
            "(--overwrite writes over them)"
        )


def export_vlora(
    store: Store,
    version: str | None,
    folder: Location,
    runner: Runner,
    overwrite: bool = False,
    options: Options = _DEFAULT_OPTIONS,
) -> dict:
    """Write a version in vlora's layout: {"version", "tasks", "out"}. Every check comes first: a
    refused export leaves the folder as it was."""
    check_folder(folder, overwrite)
    refuse_joint(
        store,
        version,
        "vlora's layout holds flat bases only",
        "export its adapters as PEFT folders with `lora-subspace export --all`",
    )
    version = store.require_version(version)
    manifest = store.manifest(version)
    refuse_residuals(
        store,
        version,
        manifest,
        "vlora's layout has no place for an adapter's own factors",
        "export its adapters as PEFT folders with `lora-subspace export --all`",
    )
    refuse_groups(
        store,
        version,
        manifest,
        "vlora's layout holds one basis per module",
        "export its adapters as PEFT folders with `lora-subspace export --all`",
    )
    modules = dict(sorted(manifest["modules"].items()))
    ranks = {e["a_shape"][0] for e in modules.values()}
    if len(ranks) != 1:
        raise PipelineError(f"vlora holds one rank for every layer; this subspace has ranks {sorted(ranks)}")
    ids = select(store, version, None)
    _refuse_unsafe(store, version, folder, ids)
    runner = for_work(runner, len(ids), version_size(manifest))
    k = {m: (e["k_a"], e["k_b"]) for m, e in modules.items()}
    per_task = 8 * sum(a + b for a, b in k.values())  # its rows as read, and as tensors
    size = max(1, min(options.task_memory // per_task, math.ceil(len(ids) / runner.num_cpus)))
    batches = [TaskFiles(store.location, version, folder, k, ids[i : i + size]) for i in range(0, len(ids), size)]
    for _ in runner.map_unordered(write_task_files, batches, memory=per_task * size):
        pass
    write_streamed(folder, BASIS, _basis_shapes(modules), _basis_tensors(store, manifest, modules))
    meta = {
        "layer_names": list(modules),
        "task_ids": ids,
        "rank": ranks.pop(),
        "num_components": max(max(a, b) for a, b in k.values()),
    }
    folder.write_bytes(json.dumps(meta, indent=2).encode(), META)
    return {"version": version, "tasks": len(ids), "out": str(folder)}


def _refuse_unsafe(store: Store, version: str, folder: Location, ids: list[str]) -> None:
    # A task id names a file (task_<id>.safetensors): one read from a store that is not a safe
    # relative path would be written outside the folder.
    unsafe = [t for t in ids if not is_safe_task_id(t)]
    if unsafe:
        shown = ", ".join(repr(t) for t in unsafe[:SHOWN_IDS])
        shown += f" and {len(unsafe) - SHOWN_IDS} more" if len(unsafe) > SHOWN_IDS else ""
        raise PipelineError(
            f"{store} {version} holds task id(s) that are not safe relative paths, so not "
            f"file names under {folder}: {shown}; nothing was written"
        )


def write_task_files(batch: TaskFiles) -> int:
    """Each task's file: its loadings of every layer, read as the batch's rows alone."""
    store = Store(batch.store)
    table = store.read_table(batch.version, LOADINGS, batch.task_ids, columns=["task_id", "module", "a", "b"])
    if table.num_rows != len(batch.task_ids) * len(batch.k):
        raise IntegrityError(f"{LOADINGS} of {store} {batch.version} does not hold one row per adapter and module")
    loadings = {}
    for layer, (k_a, k_b) in batch.k.items():
        rows = table.filter(pc.equal(table.column("module"), layer)).sort_by("task_id")
        if rows.column("task_id").to_pylist() != batch.task_ids:
            raise IntegrityError(f"{LOADINGS} of {store} {batch.version} does not hold one row per adapter and module")
        loadings[layer] = (loadings_matrix(rows, "a", k_a), loadings_matrix(rows, "b", k_b))
    for i, task_id in enumerate(batch.task_ids):
        data = {}
        for layer, (la, lb) in loadings.items():
            data[f"{layer}.loadings_a"] = la[i].clone()
            data[f"{layer}.loadings_b"] = lb[i].clone()
        batch.folder.write_bytes(save_safetensors(data), task_file(task_id))
    return len(batch.task_ids)


def _basis_shapes(modules: dict[str, dict]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for layer, e in modules.items():
        for side, k, shape in (("a", e["k_a"], e["a_shape"]), ("b", e["k_b"], e["b_shape"])):
            width = math.prod(shape)
            shapes.update(
                {f"{layer}.components_{side}": (k, width), f"{layer}.sv_{side}": (k,), f"{layer}.mean_{side}": (width,)}
            )
    return shapes


def _basis_tensors(store: Store, manifest: dict, modules: dict[str, dict]):
    """Each layer's components (decoded where packed), singular values and mean, side by side, in
    _basis_shapes' order; one basis object held at a time."""
    path, tensors = None, {}
    for layer, entry in modules.items():
        if entry["basis"] != path:
            path = entry["basis"]
            tensors = store.read_basis(path, manifest["files"][path])
        for side in "AB":
            dec = read_decomposition(tensors, layer, side)
            yield from (dec.components, dec.singular_values, dec.mean)
