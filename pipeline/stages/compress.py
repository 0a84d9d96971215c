"""Compress: discover -> scan -> plan -> compute -> assemble -> publish (see DESIGN.md)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline import __version__
from pipeline.errors import PipelineError
from pipeline.io.adapters import discover
from pipeline.io.location import Location, redact
from pipeline.io.store import CATALOG, FORMAT_VERSION, LOADINGS, LOADINGS_ROW_GROUP, REPORT, Store, basis_file
from pipeline.progress import Progress
from pipeline.runners import Runner
from pipeline.stages.compute import ComponentRule, ModuleResult, ShardResult, ShardTask, compute_shard
from pipeline.stages.plan import largest_shard_bytes, plan_shards
from pipeline.stages.scan import ScannedAdapter, check_collection, scan_batch

log = logging.getLogger(__name__)

SCAN_BATCH = 64


@dataclass(frozen=True)
class CompressOptions:
    rule: ComponentRule = ComponentRule()
    memory_budget: int = 1 << 30  # bytes of stacked factors per shard task
    strict: bool = False
    route: str = "auto"


@dataclass
class CompressSummary:
    version: str
    store: str
    adapters_ok: int
    adapters_quarantined: int
    quarantined: dict[str, str]
    modules: int
    shards: int
    error_mean: float
    error_max: float
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def scan(source: Location, runner: Runner) -> list[ScannedAdapter]:
    """Discover and validate every adapter; collection-level checks included."""
    refs = discover(source)
    batches = [refs[i : i + SCAN_BATCH] for i in range(0, len(refs), SCAN_BATCH)]
    progress = Progress("scan", len(refs), "adapters")
    scanned: list[list[ScannedAdapter]] = [[] for _ in batches]
    for index, records in runner.map_unordered(scan_batch, batches, num_cpus=0.5):
        scanned[index] = records
        progress.advance(len(records))
    progress.close()
    adapters = [a for batch in scanned for a in batch]
    check_collection(adapters)
    return adapters


def compress(source: Location, store: Store, runner: Runner, options: CompressOptions = CompressOptions()) -> CompressSummary:
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    adapters = scan(source, runner)
    seconds["scan"] = time.perf_counter() - started
    _log_quarantine(adapters)
    bad = [a for a in adapters if not a.ok]
    if options.strict and bad:
        raise PipelineError(f"--strict: {len(bad)} adapter(s) quarantined, first {bad[0].task_id!r}: {bad[0].reason}")
    store.check_writable()
    parent = store.current_version()
    version = store.new_version()
    try:
        results, good = _compute_all(adapters, source, store, version, runner, options, seconds)
        summary = _assemble(adapters, good, results, source, store, version, parent, options, seconds, started)
    except BaseException:
        store.discard(version)
        raise
    return summary


def _good(adapters: list[ScannedAdapter]) -> list[ScannedAdapter]:
    good = [a for a in adapters if a.ok]
    if not good:
        first = adapters[0]
        raise PipelineError(f"no usable adapters: all {len(adapters)} quarantined (e.g. {first.task_id!r}: {first.reason})")
    return good


def _compute_all(adapters, source, store, version, runner, options, seconds):
    """Every shard's results, in shard order. Adapters found holding NaN/Inf are quarantined and
    the shards recomputed without them, so no basis ever saw them."""
    started = time.perf_counter()
    while True:
        good = _good(adapters)
        results = _compute_shards(good, source, store, version, runner, options)
        nonfinite = {i: reason for r in results for i, reason in r.nonfinite.items()}
        if not nonfinite:
            break
        if options.strict:
            index, reason = next(iter(nonfinite.items()))
            raise PipelineError(f"--strict: adapter {good[index].task_id!r} quarantined: {reason}")
        for index, reason in nonfinite.items():
            good[index].quarantine(reason)
            log.warning("quarantined %s: %s", good[index].task_id, reason)
    seconds["compute"] = time.perf_counter() - started
    return results, good


def _compute_shards(good, source, store, version, runner, options) -> list[ShardResult]:
    modules = good[0].modules
    widths = {m: a.shape[0] * a.shape[1] + b.shape[0] * b.shape[1] for m, (a, b) in modules.items()}
    shards = plan_shards(widths, len(good), options.memory_budget, runner.num_cpus)
    peak = largest_shard_bytes(shards, widths, len(good))
    log.info("plan: %d adapters, %d modules in %d shards (largest needs ~%.0f MiB)", len(good), len(modules), len(shards), peak / 2**20)
    if peak > options.memory_budget:
        log.warning("one module alone needs ~%.0f MiB, over the %.0f MiB budget", peak / 2**20, options.memory_budget / 2**20)
    # Declared to Ray so it does not pack more shards on a node than fit; never above the budget,
    # so a single oversized module is still scheduled rather than left infeasible.
    memory = min(peak, options.memory_budget)

    def task(shard, fixed_k=None):
        weights = [(a.weights_path, {m: a.modules[m] for m in shard.modules}) for a in good]
        return ShardTask(shard, options.rule, source, store.location, version, weights, fixed_k, options.route)

    progress = Progress("compute", len(shards), "shards")
    results: list[ShardResult | None] = [None] * len(shards)
    fixed_k = None
    pending = list(shards)
    if options.rule.needs_first_module:
        # vlora's rule: k comes from the first module's lora_A, so that shard runs first.
        for _, first in runner.map_unordered(compute_shard, [task(shards[0])], use_gpu=True, memory=memory):
            results[0], fixed_k = first, first.decided_k
        progress.advance()
        if first.nonfinite:
            return [first]
        pending = shards[1:]
    for index, result in runner.map_unordered(compute_shard, [task(s, fixed_k) for s in pending], use_gpu=True, memory=memory):
        results[pending[index].index] = result
        progress.advance()
    progress.close()
    return results


def _assemble(adapters, good, results, source, store, version, parent, options, seconds, started) -> CompressSummary:
    t0 = time.perf_counter()
    modules = [m for r in results for m in r.modules]
    n = len(good)
    errors = np.stack([m.errors.numpy() for m in modules], axis=1)  # (N, modules)
    files = {basis_file(r.shard.name): r.file.to_dict() for r in results}
    files[LOADINGS] = store.write_table(version, LOADINGS, loadings_table([a.task_id for a in good], modules, errors), LOADINGS_ROW_GROUP).to_dict()
    files[CATALOG] = store.write_table(version, CATALOG, catalog_table(adapters)).to_dict()
    per_adapter_mean = errors.mean(axis=1)
    quarantined = {a.task_id: a.reason for a in adapters if not a.ok}
    seconds["write"] = time.perf_counter() - t0 + sum(r.seconds.get("write", 0.0) for r in results)
    report = {
        "version": version,
        "adapters": {"ok": n, "quarantined": len(quarantined)},
        "quarantined": quarantined,
        "warnings": {a.task_id: a.warnings for a in adapters if a.warnings},
        "error": _summary(per_adapter_mean, errors.max(axis=1)),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "shards": [
            {"name": r.shard.name, "modules": len(r.shard.modules), "bytes_read": r.bytes_read, "requests": r.requests,
             "seconds": {k: round(v, 3) for k, v in r.seconds.items()}}
            for r in results
        ],
    }
    files[REPORT] = store.write_object(version, REPORT, json.dumps(report, indent=1).encode()).to_dict()
    manifest = {
        "format_version": FORMAT_VERSION,
        "version": version,
        "parent": parent,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tool": f"lora-subspace {__version__}",
        "source": redact(source.uri),
        "parameters": {
            "components": options.rule.components,
            "variance_threshold": None if options.rule.components is not None else options.rule.variance_threshold,
            "adaptive": options.rule.adaptive,
            "svd_route": options.route,
        },
        "adapters": {"ok": n, "quarantined": len(quarantined)},
        "original_bytes": sum(a.weights_bytes + len(a.config_text.encode()) for a in good),
        "base_model": good[0].base_model,
        "modules": {m.module: _module_entry(m, r.shard.name, good[0].dtype) for r in results for m in r.modules},
        "files": files,
    }
    store.publish(version, manifest)
    seconds["publish"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started
    log.info("published %s: %d adapters, %d quarantined", version, n, len(quarantined))
    return CompressSummary(
        version, str(store), n, len(quarantined), quarantined, len(modules), len(results),
        float(per_adapter_mean.mean()), float(errors.max()), {k: round(v, 3) for k, v in seconds.items()},
    )


def _module_entry(m: ModuleResult, shard: str, dtype: str) -> dict:
    return {
        "shard": shard, "a_shape": list(m.a_shape), "b_shape": list(m.b_shape), "dtype": dtype,
        "k_a": m.k_a, "k_b": m.k_b, "explained_variance_a": round(m.explained_a, 6),
        "explained_variance_b": round(m.explained_b, 6), "svd_route": m.route,
    }


def _summary(means: np.ndarray, maxes: np.ndarray) -> dict:
    return {
        "mean": float(means.mean()), "p50": float(np.median(means)), "p95": float(np.quantile(means, 0.95)),
        "max": float(maxes.max()),
    }


def loadings_table(task_ids: list[str], modules: list[ModuleResult], errors: np.ndarray) -> pa.Table:
    """One row per (task, module), task-major, modules in order: task_id, module, a, b, error."""
    n, count = len(task_ids), len(modules)

    def side(get) -> pa.Array:
        widths = np.array([get(m).shape[1] for m in modules])
        values = np.concatenate([get(m).numpy() for m in modules], axis=1).astype(np.float32)  # (N, sum k)
        starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
        offsets = (np.arange(n)[:, None] * widths.sum() + starts[None, :]).reshape(-1)
        offsets = np.append(offsets, n * widths.sum()).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1)))

    return pa.table({
        "task_id": pa.array(np.repeat(np.array(task_ids, dtype=object), count), pa.string()),
        "module": pa.array([m.module for m in modules] * n, pa.string()),
        "a": side(lambda m: m.loadings_a),
        "b": side(lambda m: m.loadings_b),
        "error": pa.array(errors.reshape(-1).astype(np.float32)),
    })


def catalog_table(adapters: list[ScannedAdapter]) -> pa.Table:
    rows = sorted(adapters, key=lambda a: a.task_id)
    config = [a.config or {} for a in rows]
    return pa.table({
        "task_id": pa.array([a.task_id for a in rows], pa.string()),
        "uri": pa.array([redact(a.location.uri) for a in rows], pa.string()),
        "status": pa.array([a.status for a in rows], pa.string()),
        "reason": pa.array([a.reason for a in rows], pa.string()),
        "warnings": pa.array([a.warnings for a in rows], pa.list_(pa.string())),
        "weights_bytes": pa.array([a.weights_bytes for a in rows], pa.int64()),
        "weights_tag": pa.array([a.weights_tag for a in rows], pa.string()),
        "rank": pa.array([a.rank for a in rows], pa.int32()),
        "lora_alpha": pa.array([c.get("lora_alpha") for c in config], pa.float64()),
        "use_rslora": pa.array([bool(c.get("use_rslora")) for c in config], pa.bool_()),
        "base_model": pa.array([a.base_model for a in rows], pa.string()),
        "dtype": pa.array([a.dtype for a in rows], pa.string()),
        "config_json": pa.array([a.config_text for a in rows], pa.string()),
    })


def _log_quarantine(adapters: list[ScannedAdapter]) -> None:
    for a in adapters:
        for warning in a.warnings:
            log.warning("%s: %s", a.task_id, warning)
        if not a.ok:
            log.warning("quarantined %s: %s", a.task_id, a.reason)
