"""vlora-import's steps: the task files' headers scanned, then one task per group of layers that
reads, by byte ranges, the group's bases from vlora's basis file and every task's loadings of the
group, and writes what a compress shard writes (the basis object and the staged loadings rows),
for assemble and publish to make the version.

vlora keeps neither the total variance nor the original adapters. An imported basis therefore
counts its kept variance as the total (explained variance 1), and each task's error is relative
to what vlora stored (0: the import is lossless); `rebase --full --from-source` against the
original adapters measures the real errors.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import torch

from pipeline.errors import AdapterError, PipelineError
from pipeline.flow.plan import Shard, basis_objects
from pipeline.flow.scan import check_task_id
from pipeline.flow.strategies import ModuleResult, ShardResult, explained
from pipeline.io.adapters import read_ranges
from pipeline.io.format import (
    LOADINGS_KEYS,
    LOADINGS_SCHEMA,
    basis_file,
    basis_tensors,
    encode_basis,
    loadings_rows,
    staging_file,
)
from pipeline.io.location import Location
from pipeline.io.safetensors_ranges import TensorInfo, decode
from pipeline.io.store import Store
from pipeline.io.tables import write_tables
from pipeline.io.vlora import BASIS, FIELDS, Layout, task_file, task_loadings
from pipeline.linalg.decompose import Decomposition
from pipeline.linalg.loadings import factor_basis, onto_rows, orthonormal_rows
from pipeline.linalg.metrics import pair_grams, rebuilt_inner
from pipeline.progress import Progress

log = logging.getLogger(__name__)

SCAN_BATCH = 256  # task files whose headers one scan task reads
SCAN_THREADS = 16  # header reads in flight in one scan task (latency, not CPU)
READ_BYTES = 64 << 20  # loadings bytes per read: bounds what reading holds at once

Loadings = dict[str, tuple[TensorInfo, TensorInfo]]  # layer -> where loadings_a, loadings_b lie in a task file


@dataclass
class ScanBatch:
    layout: Layout
    task_ids: list[str]


@dataclass
class ImportTask:
    """One group of layers: their ranges in the basis file and in every task file, nothing else."""

    shard: Shard
    store: Location
    version: str
    folder: Location
    rank: int
    count: int  # the tasks the bases hold
    basis: dict[str, dict[str, TensorInfo]]  # layer -> "components_a" ... -> range in BASIS
    tasks: list[tuple[str, Loadings]]  # sorted by task id


def scan_tasks(layout: Layout, runner) -> dict[str, Loadings]:
    """Every task's loadings ranges (task id -> its layers'), the ids checked as a scan checks them."""
    ids = list(dict.fromkeys(layout.task_ids))
    for task_id in ids:
        try:
            check_task_id(task_id)
        except AdapterError as exc:
            raise PipelineError(f"{layout.folder}: {exc}") from None
    batches = [ScanBatch(layout, ids[i : i + SCAN_BATCH]) for i in range(0, len(ids), SCAN_BATCH)]
    found: dict[str, Loadings] = {}
    for _, part in runner.map_unordered(scan_batch, batches):
        found.update(part)
    return dict(sorted(found.items()))


def scan_batch(batch: ScanBatch) -> dict[str, Loadings]:
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        infos = pool.map(lambda t: task_loadings(batch.layout.folder, t, batch.layout), batch.task_ids)
        return dict(zip(batch.task_ids, infos))


def compute_imported(
    layout: Layout, found: dict[str, Loadings], change, source, store, version, runner, options, seconds
):
    """write_version's compute for an import: each group of layers (within the memory budget, and
    at least one per CPU) read and written by one task."""
    started = time.perf_counter()
    n = len(found)
    sizes = {layer: layer_bytes(layout, layer, n) for layer in layout.layers}
    shards = basis_objects(sizes, min(options.task_memory, max(sum(sizes.values()) // runner.num_cpus, 1)))
    memory = min(max(sum(sizes[m] for m in s.modules) for s in shards), options.task_memory)
    log.info(
        "plan: %d tasks, %d layers in %d shards (largest needs ~%.0f MiB)", n, len(sizes), len(shards), memory / 2**20
    )
    tasks = [
        ImportTask(
            shard,
            store.location,
            version,
            layout.folder,
            layout.rank,
            n,
            {m: layout.basis[m] for m in shard.modules},
            [(t, {m: infos[m] for m in shard.modules}) for t, infos in found.items()],
        )
        for shard in shards
    ]
    results: list = [None] * len(tasks)
    progress = Progress("import", len(tasks), "shards")
    for index, result in runner.map_unordered(import_shard, tasks, memory=memory):
        results[index] = result
        progress.advance()
    progress.close()
    seconds["compute"] = time.perf_counter() - started
    return results, []


def layer_bytes(layout: Layout, layer: str, tasks: int) -> int:
    """What a task holds of one layer: its bases (float32, and float64 while made orthonormal)
    and every task's loadings on them."""
    sides = [(layout.k(layer, s), layout.width(layer, s)) for s in "ab"]
    return sum(12 * k * d + 8 * d + 8 * tasks * k for k, d in sides)


def import_shard(task: ImportTask) -> ShardResult:
    """Read the group's bases and loadings, write its basis object and staged loadings rows."""
    clock = time.perf_counter()
    store = Store(task.store)
    bases, moves = _read_bases(task)
    loadings = _read_loadings(task, moves)
    ids = [t for t, _ in task.tasks]
    tensors, tables, summaries = {}, [], []
    for layer in task.shard.modules:
        a, b = bases[layer]
        shapes = ((task.rank, a.mean.numel() // task.rank), (b.mean.numel() // task.rank, task.rank))
        la, lb = loadings[layer]
        # ||B A|| of what the loadings rebuild: an imported task is what it rebuilds (error 0).
        basis = factor_basis(a, b, shapes)
        norm = rebuilt_inner(pair_grams(basis, basis), la, lb, la, lb).clamp_min(0).sqrt()
        tables.append(loadings_rows(ids, layer, la, lb, torch.zeros(len(ids), dtype=torch.float64), norm, False))
        tensors.update(basis_tensors(layer, "A", a))
        tensors.update(basis_tensors(layer, "B", b))
        k_a, k_b = len(a.singular_values), len(b.singular_values)
        summaries.append(ModuleResult(layer, *shapes, k_a, k_b, explained(a), explained(b), "vlora", task.count))
    result = ShardResult(
        task.shard, store.write_object(task.version, basis_file(task.shard.name), encode_basis(tensors))
    )
    result.modules = summaries
    rows = [pa.concat_tables(tables).sort_by([(k, "ascending") for k in LOADINGS_KEYS])]
    write_tables(store.version_location(task.version), staging_file(task.shard.name), rows, LOADINGS_SCHEMA)
    result.seconds["total"] = time.perf_counter() - clock
    return result


def _read_bases(task: ImportTask) -> tuple[dict[str, tuple[Decomposition, Decomposition]], dict]:
    """Each layer's bases, their components made orthonormal (and R per (layer, side), None
    where they were, to move the loadings with)."""
    keys = [(layer, f"{f}_{s}") for layer in task.shard.modules for s in "ab" for f in FIELDS]
    (buffers,), _ = read_ranges(task.folder.fs, [(task.folder.path(BASIS), [task.basis[m][f] for m, f in keys])])
    read = {key: decode(buffer, task.basis[key[0]][key[1]]) for key, buffer in zip(keys, buffers)}
    bases, moves = {}, {}
    for layer in task.shard.modules:
        decs = []
        for side in "ab":
            components, sv, mean = (read[layer, f"{f}_{side}"] for f in FIELDS)
            if not all(torch.isfinite(t).all() for t in (components, sv, mean)):
                raise PipelineError(f"{task.folder}/{BASIS}: NaN or Inf in {layer} lora_{side.upper()}")
            sv = sv.to(torch.float32)
            components, moves[layer, side] = orthonormal_rows(components)
            total = float((sv.double() ** 2).sum())
            decs.append(Decomposition(components, sv, mean.to(torch.float32).reshape(-1), total, "vlora", task.count))
        bases[layer] = (decs[0], decs[1])
    return bases, moves


def _read_loadings(task: ImportTask, moves: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(n, k_a), (n, k_b) float32 loadings per layer, on the orthonormal components, read
    READ_BYTES at a time."""
    layers = task.shard.modules
    out = {m: [torch.empty(len(task.tasks), task.basis[m][f"components_{s}"].shape[0]) for s in "ab"] for m in layers}
    begin = 0
    while begin < len(task.tasks):
        end, size = begin, 0
        while end < len(task.tasks) and (end == begin or size < READ_BYTES):
            size += sum(i.end - i.start for m in layers for i in task.tasks[end][1][m])
            end += 1
        requests = [
            (task.folder.path(task_file(t)), [i for m in layers for i in infos[m]])
            for t, infos in task.tasks[begin:end]
        ]
        blobs, _ = read_ranges(task.folder.fs, requests)
        for row, ((_, infos), buffers) in enumerate(zip(requests, blobs), start=begin):
            for position, (info, buffer) in enumerate(zip(infos, buffers)):
                out[layers[position // 2]][position % 2][row] = decode(buffer, info).to(torch.float32)
        begin = end
    return {m: (onto_rows(a, moves[m, "a"]), onto_rows(b, moves[m, "b"])) for m, (a, b) in out.items()}
